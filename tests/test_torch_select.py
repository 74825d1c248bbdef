"""The installers' GPU -> torch build choice (installer/torch_select.py), table-driven."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "installer" / "torch_select.py"
_spec = importlib.util.spec_from_file_location("torch_select", SCRIPT)
ts = importlib.util.module_from_spec(_spec)
sys.modules["torch_select"] = ts   # dataclasses look their module up
_spec.loader.exec_module(ts)

M40 = "Tesla M40 24GB, 5.2"
P40 = "Tesla P40, 6.1"
GTX1080 = "NVIDIA GeForce GTX 1080, 6.1"
V100 = "Tesla V100-SXM2-16GB, 7.0"
T4 = "Tesla T4, 7.5"
RTX3090 = "NVIDIA GeForce RTX 3090, 8.6"
RTX4090 = "NVIDIA GeForce RTX 4090, 8.9"
H100 = "NVIDIA H100 80GB HBM3, 9.0"
RTX5090 = "NVIDIA GeForce RTX 5090, 12.0"
K80 = "Tesla K80, 3.7"


def smi(driver, *cards):
    return "\n".join(f"{c}, {driver}" for c in cards) + "\n"


CASES = [
    # (id, nvidia-smi output, platform, amd, expected build, expected torch)
    ("no-gpu", "", "linux", [], "cpu", "2.13.0"),
    ("m40-new-driver", smi("580.95.05", M40), "linux", [], "cu126", "2.13.0"),
    ("m40-470-driver", smi("470.256.02", M40), "linux", [], "cu118", "2.7.1"),
    ("m40-ancient-driver", smi("418.226.00", M40), "linux", [], "cpu", "2.13.0"),
    ("pascal-535", smi("535.247.01", GTX1080), "linux", [], "cu126", "2.13.0"),
    ("p40-windows-old", smi("516.94", P40), "windows", [], "cu118", "2.7.1"),
    ("volta-580", smi("580.65.06", V100), "linux", [], "cu126", "2.13.0"),
    ("turing-580", smi("580.65.06", T4), "linux", [], "cu130", "2.13.0"),
    ("turing-550", smi("550.144.03", T4), "linux", [], "cu126", "2.13.0"),
    ("ampere-580", smi("580.82.07", RTX3090), "linux", [], "cu130", "2.13.0"),
    ("ampere-windows-560", smi("560.94", RTX3090), "windows", [], "cu126", "2.13.0"),
    ("ada-575", smi("575.64", RTX4090), "linux", [], "cu126", "2.13.0"),
    ("ada-590", smi("590.44.01", RTX4090), "linux", [], "cu130", "2.13.0"),
    ("hopper-580", smi("580.65.06", H100), "linux", [], "cu130", "2.13.0"),
    ("blackwell-580", smi("580.95.05", RTX5090), "linux", [], "cu130", "2.13.0"),
    ("blackwell-windows-581", smi("581.57", RTX5090), "windows", [], "cu130", "2.13.0"),
    ("blackwell-572", smi("572.16", RTX5090), "linux", [], "cu128", "2.11.0"),
    ("windows-driver-between-linux-and-windows-minimum", smi("526.98", RTX3090), "windows", [], "cu118", "2.7.1"),
    ("mixed-m40-ada", smi("580.95.05", M40, RTX4090), "linux", [], "cu126", "2.13.0"),
    ("mixed-pascal-turing-old-driver", smi("470.256.02", GTX1080, T4), "linux", [], "cu118", "2.7.1"),
    ("mixed-m40-blackwell", smi("580.95.05", M40, RTX5090), "linux", [], "cu126", "2.13.0"),
    ("kepler", smi("470.256.02", K80), "linux", [], "cpu", "2.13.0"),
    ("amd-linux", "", "linux", ["gfx1100"], "rocm7.2", "2.13.0"),
    ("amd-windows", "", "windows", ["gfx1100"], "cpu", "2.13.0"),
    ("nvidia-wins-over-amd", smi("580.95.05", RTX3090), "linux", ["gfx1030"], "cu130", "2.13.0"),
]


@pytest.mark.parametrize("smi_out,platform,amd,build,torch", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_choice_table(smi_out, platform, amd, build, torch):
    gpus, driver = ts.parse_nvidia_smi(smi_out)
    choice = ts.choose(gpus, driver, platform, amd)
    assert (choice.build, choice.torch) == (build, torch), choice.reasons
    assert choice.index_url == f"https://download.pytorch.org/whl/{build}"
    assert choice.requirement == f"torch=={torch}+{build}"
    assert choice.reasons and all(isinstance(r, str) and r for r in choice.reasons)
    assert choice.needs_bytes > 0


def test_reasons_say_why_in_plain_words():
    gpus, driver = ts.parse_nvidia_smi(smi("418.226.00", M40))
    text = " ".join(ts.choose(gpus, driver, "linux").reasons)
    assert "450.80.02" in text and "update the NVIDIA driver" in text
    gpus, driver = ts.parse_nvidia_smi(smi("580.95.05", M40, RTX5090))
    text = " ".join(ts.choose(gpus, driver, "linux").reasons)
    assert "RTX 5090" in text and "will not be used" in text and "Tesla M40" in text
    gpus, driver = ts.parse_nvidia_smi(smi("470.256.02", K80))
    assert "3.7" in " ".join(ts.choose(gpus, driver, "linux").reasons)


def test_kernel_coverage_follows_the_binary_compatibility_rule():
    cu130, cu126 = ts.ALL["cu130"], ts.ALL["cu126"]
    assert ts.runs_on(cu126, "5.2", "linux") and ts.runs_on(cu126, "8.9", "linux")
    assert not ts.runs_on(cu126, "12.0", "linux") and not ts.runs_on(cu130, "6.1", "linux")
    # PTX for 12.0 is shipped on Linux only: a newer architecture JIT-compiles there, not on Windows.
    assert ts.runs_on(cu130, "13.0", "linux") and not ts.runs_on(cu130, "13.0", "windows")


def test_override_is_honoured_and_warns_about_left_out_gpus():
    gpus, driver = ts.parse_nvidia_smi(smi("580.95.05", M40))
    choice = ts.choose(gpus, driver, "linux", override="cu130")
    assert choice.build == "cu130"
    assert "chosen by you" in choice.reasons[0] and "Tesla M40" in choice.reasons[1]
    assert ts.choose([], None, "linux", override="cpu").build == "cpu"
    with pytest.raises(ValueError, match="cu999"):
        ts.choose([], None, "linux", override="cu999")


def test_nvidia_smi_parsing_tolerates_commas_in_names_and_junk():
    gpus, driver = ts.parse_nvidia_smi("NVIDIA A100-SXM4-80GB, Rev. B, 8.0, 550.54.15\n\nNo devices were found\n")
    assert [(g.name, g.compute_cap) for g in gpus] == [("NVIDIA A100-SXM4-80GB, Rev. B", "8.0")]
    assert driver == "550.54.15"


def test_cli_prints_the_choice_as_json(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "MODRON_FAKE_NVIDIA_SMI": smi("580.95.05", RTX4090).replace("\n", ";"),
           "MODRON_FAKE_ROCM": ""}
    out = subprocess.run([sys.executable, str(SCRIPT), "--json", "--platform", "linux"], env=env,
                         capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    assert data["build"] == "cu130" and data["requirement"] == "torch==2.13.0+cu130"
    assert data["gpus"] == [{"name": "NVIDIA GeForce RTX 4090", "compute_cap": "8.9"}]
    bad = subprocess.run([sys.executable, str(SCRIPT), "--torch", "cu999"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "cu999" in bad.stderr and "Traceback" not in bad.stderr
