"""The dependency locks (installer/lock.py, installer/locks/) agree with pyproject.toml: every dependency is
locked at a version it allows, on every platform and Python the installers serve; the torch build's own
packages are not in them. No network: the check only reads files."""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("lock", ROOT / "installer" / "lock.py")
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)


def test_the_locks_agree_with_pyproject():
    out = subprocess.run([sys.executable, str(ROOT / "installer" / "lock.py"), "--check"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    names = {p.name for p in (ROOT / "installer" / "locks").glob("*.txt")}
    assert {"torch-2.13.0.txt", "torch-2.11.0.txt", "torch-2.7.1.txt", "dev.txt"} <= names
    for path in (ROOT / "installer" / "locks").glob("*.txt"):
        locked = {n.lower() for n, _, _ in lock.entries(path.read_text())}
        assert {"transformers", "peft", "pyside6-essentials", "numpy"} <= locked
        assert "torch" not in locked and not any(n.startswith("nvidia-cu") for n in locked)
        assert "--hash=sha256:" in path.read_text()
    dev = {n.lower() for n, _, _ in lock.entries((ROOT / "installer" / "locks" / "dev.txt").read_text())}
    assert {"pytest", "pytest-qt", "import-linter"} <= dev


def test_a_changed_pyproject_is_caught(tmp_path):
    locks = tmp_path / "locks"
    shutil.copytree(ROOT / "installer" / "locks", locks)
    text = (ROOT / "pyproject.toml").read_text()
    raised = tmp_path / "raised.toml"   # a new minimum no locked version meets, and a new dependency
    raised.write_text(text.replace('"peft>=0.13",', '"peft>=99",\n    "left-pad-nowhere>=1",'))
    problems = lock.check(raised, locks)
    assert any("peft==" in p and "peft>=99" in p for p in problems), problems
    assert any("left-pad-nowhere>=1 is not locked" in p for p in problems), problems
    (locks / "torch-2.7.1.txt").unlink()
    assert any("torch-2.7.1.txt is missing" in p for p in lock.check(ROOT / "pyproject.toml", locks))


def test_only_what_torch_alone_needs_is_dropped():
    compiled = """\
filelock==3.0 \\
    --hash=sha256:aa
    # via
    #   huggingface-hub
    #   torch
mpmath==1.3.0 \\
    --hash=sha256:bb
    # via sympy
nvidia-ml-py==13.0 \\
    --hash=sha256:cc
    # via modron (pyproject.toml)
sympy==1.14.0 \\
    --hash=sha256:dd
    # via torch
torch==2.13.0 \\
    --hash=sha256:ee
    # via
    #   modron (pyproject.toml)
    #   peft
"""
    kept = [n for n, _, _ in lock.entries(lock.strip_torch(compiled))]
    assert kept == ["filelock", "nvidia-ml-py"]
