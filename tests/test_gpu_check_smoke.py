"""bench/gpu_check.py stays runnable: a lent GPU machine gets one try at it, so its CPU smoke mode runs here.
Two of its quick sections (OOM recovery through the engine's test hook, fused AdamW), ~10 s on 2 quiet
cores; `.venv/bin/python bench/gpu_check.py --smoke` runs all seven (~1 min)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_check_smoke_sections_run_and_pass():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--sections", "5,7"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert lines[0]["check"] == "hardware" and lines[0]["device"] == "cpu"
    sections = {d["check"]: d for d in lines if "section" in d}
    assert set(sections) == {"real_oom", "fused_adamw"}
    for name, d in sections.items():
        assert d["ok"] and d["passed"] is True and d["elapsed_s"] >= 0, (name, d)
    assert sections["real_oom"]["figures"]["recoveries"] and sections["real_oom"]["figures"]["real_oom"] is False
    assert sections["fused_adamw"]["null"]["fused_not_slower"]     # GPU-only figures say why they are null
    summary = lines[-1]
    assert summary["check"] == "summary" and summary["ran_ok"] == 2 and not summary["failed"]
