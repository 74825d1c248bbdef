"""Rules from DEVELOPERS.md that code can check."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QT = re.compile(r"^\s*(from|import)\s+(PySide6|PyQt\d|pyqtgraph|shiboken\d)\b", re.M)
HEAVY = re.compile(r"^\s*(from|import)\s+(torch|transformers|peft|hivemind|safetensors)\b", re.M)
UNPICKLE = re.compile(r"pickle\.loads?\(|torch\.load\((?![^)]*weights_only=True)")


def sources(folder):
    return sorted((ROOT / folder).rglob("*.py"))


def test_training_core_never_imports_qt():
    bad = [str(p) for p in sources("training_core") if QT.search(p.read_text(encoding="utf-8"))]
    assert bad == []


def test_app_never_imports_the_training_stack():
    bad = [str(p) for p in sources("app") if HEAVY.search(p.read_text(encoding="utf-8"))]
    assert bad == []


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
