"""`modron-train` as a user runs it: exit codes, one-line errors, JSON output, LoRA + export."""
import json
import subprocess
import sys
from pathlib import Path


from helpers import make_local_model, write_text_dataset
from training_core.protocol import decode_event

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "training_core.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_missing_data_path_is_one_line_exit_2(tmp_path):
    missing = tmp_path / "nope" / "stories.txt"
    proc = cli("finetune", "--model", "scratch:tiny", "--data", missing, "--out", tmp_path / "run", "--steps", 2)
    assert_one_line_error(proc, str(missing))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_model_folder_without_weights_is_one_line_exit_2(tmp_path):
    data = tmp_path / "d.txt"
    write_text_dataset(data)
    folder = tmp_path / "empty model"
    folder.mkdir()
    proc = cli("finetune", "--model", folder, "--data", data, "--out", tmp_path / "run", "--steps", 2)
    assert_one_line_error(proc, "empty model")


def test_unknown_preset_and_bad_flags_are_one_line(tmp_path):
    data = tmp_path / "d.txt"
    write_text_dataset(data)
    proc = cli("finetune", "--model", "scratch:gigantic", "--data", data, "--out", tmp_path / "r", "--steps", 2)
    assert_one_line_error(proc, "gigantic", "tiny")
    proc = cli("finetune", "--model", "scratch:tiny", "--data", data, "--out", tmp_path / "r", "--steps", 0)
    assert_one_line_error(proc, "--steps")


def test_export_bad_quant_and_no_target_are_one_line(tmp_path):
    """An unknown --quant names the valid ones (not argparse's usage text); an export with nothing to write
    names every kind of output, GGUF included."""
    proc = cli("export", tmp_path, "--gguf", tmp_path / "x.gguf", "--quant", "q2_k")
    assert_one_line_error(proc, "--quant", "q2_k", "f16", "q8_0", "q4_k_m", "q6_k")
    proc = cli("export", tmp_path)
    assert_one_line_error(proc, "--merged OUT", "--adapter OUT", "--gguf OUT.gguf", "--gguf-lora OUT.gguf")


def test_hardware_json_falls_back_to_cpu():
    proc = cli("hardware", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["cpu_cores_logical"] >= 1 and report["ram_total"] > 0
    assert report["gpus"] == [] and report["nvml"] != "ok"   # this machine has no NVIDIA driver
    text = cli("hardware")
    assert text.returncode == 0 and "CPU" in text.stdout


def test_validate_prints_format_records_and_preview(tmp_path):
    data = tmp_path / "my data ü.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Say {i}", "input": "", "output": f"I say {i}."})
                              for i in range(10)), encoding="utf-8")
    proc = cli("validate", "--data", data, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["records"] == 10 and report["format"] == "alpaca"
    assert "Say 0" in report["preview"][0]
    text = cli("validate", "--data", data)
    assert text.returncode == 0 and "10" in text.stdout


def test_finetune_lora_json_then_export_merged_loads_in_plain_transformers(tmp_path):
    data = tmp_path / "train data.txt"
    write_text_dataset(data)
    base = make_local_model(tmp_path / "base model")
    out = tmp_path / "run"
    proc = cli("finetune", "--model", base, "--data", data, "--out", out, "--steps", 6, "--seq-len", 32,
               "--batch-size", 4, "--threads", 1, "--lr", 1e-2, "--json")
    assert proc.returncode == 0, proc.stderr
    events = [decode_event(l) for l in proc.stdout.splitlines()]
    started = next(e for e in events if e["type"] == "started")
    assert started["method"] == "lora" and 0 < started["params_trainable"] < started["params_total"]
    pre = next(e for e in events if e["type"] == "preflight")
    assert pre["licence"]["klass"] == "permissive"
    assert events[-1]["type"] == "finished"

    merged = tmp_path / "merged"
    proc = cli("export", out, "--merged", merged)
    assert proc.returncode == 0, proc.stderr
    check = ("import sys; from transformers import AutoModelForCausalLM, AutoTokenizer;"
             "m=AutoModelForCausalLM.from_pretrained(sys.argv[1]); t=AutoTokenizer.from_pretrained(sys.argv[1]);"
             "ids=t('Once upon a time', return_tensors='pt').input_ids;"
             "out=m.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=t.pad_token_id);"
             "print(out.shape[1]-ids.shape[1])")
    gen = subprocess.run([sys.executable, "-c", check, str(merged)], capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip() == "5"
    card = (merged / "README.md").read_text(encoding="utf-8")
    assert "apache-2.0" in card and "permissive" in card.lower()
    # Exporting again onto the same folder is refused in one line.
    assert_one_line_error(cli("export", out, "--merged", merged), str(merged))


def test_demo_runs_and_loss_falls(tmp_path):
    proc = cli("demo", "--out", tmp_path / "demo", "--steps", 40, "--json")
    assert proc.returncode == 0, proc.stderr
    events = [decode_event(l) for l in proc.stdout.splitlines()]
    steps = [e for e in events if e["type"] == "step"]
    assert events[-1]["type"] == "finished"
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert any(e["type"] == "sample" for e in events)


def test_resume_of_a_finished_run_is_harmless_and_finetune_refuses_to_overwrite(tmp_path):
    data = tmp_path / "d.txt"
    write_text_dataset(data)
    args = ["finetune", "--model", "scratch:tiny", "--tokenizer", "bytes", "--data", data, "--out", tmp_path / "r",
            "--steps", 3, "--seq-len", 32, "--batch-size", 4, "--threads", 1]
    assert cli(*args).returncode == 0
    assert_one_line_error(cli(*args), "resume")
    again = cli("resume", tmp_path / "r", "--json")
    assert again.returncode == 0, again.stderr
    assert [decode_event(l) for l in again.stdout.splitlines()][-1]["type"] == "finished"
    assert_one_line_error(cli("resume", tmp_path / "not-a-run"), "not-a-run")
