"""Rules from DEVELOPERS.md that code can check.

Which package may import which is import-linter's job: the contracts are in pyproject.toml
([tool.importlinter]) and `lint-imports` checks them here, chains through other modules included.
"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:     # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
UNPICKLE = re.compile(r"pickle\.loads?\(|torch\.load\((?![^)]*weights_only=True)")
CONTRACTS = {"core-no-gui", "app-no-training-stack", "app-uses-light-core", "installer-standalone",
             "swarm-below-cli", "views-display-only"}
PACKAGES = ("app", "training_core", "installer", "resources")


def sources(folder):
    return sorted((ROOT / folder).rglob("*.py"))


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """`lint-imports` (from the dev extra, beside this Python) on the pyproject.toml in `cwd`."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "lint-imports not found beside this Python: install the dev extra (pip install -e '.[dev]')"
    return subprocess.run([exe, "--no-cache", "--no-logo"], cwd=cwd, capture_output=True, text=True, timeout=120)


def contract_names(pyproject: Path) -> dict[str, str]:
    contracts = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["importlinter"]["contracts"]
    return {c["id"]: c["name"] for c in contracts}


def test_the_layers_are_kept():
    assert set(contract_names(ROOT / "pyproject.toml")) == CONTRACTS
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in out.stdout, out.stdout


def test_a_broken_layer_is_reported(tmp_path):
    """The same contracts on a copy of the code with one forbidden import for each, two of them indirect."""
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "__pycache__" not in path.parts:
                copy = tmp_path / path.relative_to(ROOT)
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, copy)
    shutil.copyfile(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")

    def add(relative: str, code: str) -> None:
        path = tmp_path / relative
        path.write_text(path.read_text(encoding="utf-8") + code, encoding="utf-8")

    add("training_core/errors.py", "\n\ndef _gui():\n    from app import tray\n")   # inside a function counts too
    add("app/tray.py", "\nimport training_core.engine\n")                         # engine imports torch
    add("installer/write_record.py", "\nfrom training_core.paths import data_dir\n")
    add("training_core/swarm/commands.py", "\n\ndef _loop():\n    from ..cli import PROG\n")   # the old loop
    add("app/views/history.py", "\nimport subprocess\n")

    out = lint_imports(tmp_path)
    report = out.stdout + out.stderr
    assert out.returncode == 1, report
    assert f"Contracts: 0 kept, {len(CONTRACTS)} broken." in report
    for name in contract_names(tmp_path / "pyproject.toml").values():
        assert re.search(rf"^{re.escape(name)}\s*BROKEN", report, re.M), (name, report)
    assert "training_core.errors -> app.tray" in report
    assert "app.tray -> PySide6" in report                     # the second link of training_core -> app -> Qt
    assert "app.tray -> training_core.engine" in report
    assert "training_core.engine -> torch" in report           # the second link of app -> engine -> torch
    assert "installer.write_record -> training_core.paths" in report
    assert "training_core.swarm.commands -> training_core.cli" in report
    assert "app.views.history -> subprocess" in report


def test_nothing_unpickles():
    bad = [str(p) for folder in ("training_core", "app") for p in sources(folder)
           if UNPICKLE.search(p.read_text(encoding="utf-8"))]
    assert bad == []


def test_remote_code_is_off_by_default():
    from training_core.config import JobSpec
    assert JobSpec(model="m", data=["d"], out="o").trust_remote_code is False


def test_protocol_and_hardware_import_without_torch():
    code = ("import sys; import training_core.protocol, training_core.hardware, training_core.config, "
            "training_core.errors; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
