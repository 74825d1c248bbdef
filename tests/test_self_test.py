"""`modron --self-test`: the installers' last check, with no display."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app import self_test

ROOT = Path(__file__).resolve().parents[1]


def _event(type_, **fields):
    from training_core.protocol import make_event
    base = {"started": dict(job_id="x", run_dir="r", device="cpu", precision="fp32", method="full", model="m",
                            params_total=1, params_trainable=1, total_steps=2, resumed_from=None),
            "step": dict(step=1, total_steps=2, epoch=0, loss=3.0, lr=0.1, tokens_per_s=1, samples_per_s=1,
                         vram_used=0, vram_reserved=0, ram_used=0, eta_s=1, elapsed_s=1, tokens_seen=1),
            "finished": dict(step=2, run_dir="r", final_loss=2.0, final_eval_loss=None, checkpoint="c",
                             elapsed_s=1)}[type_]
    return make_event(type_, **{**base, **fields})


def test_events_of_a_healthy_run_pass_and_broken_ones_are_named():
    good = [_event("started"), _event("step", step=1), _event("step", step=2), _event("finished")]
    assert self_test.check_events(good, steps=2) == ""
    nan = [_event("started"), _event("step", loss=float("nan")), _event("finished")]
    assert "not a finite number" in self_test.check_events(nan, steps=2)   # NaN crosses the pipe as null
    assert "'finished'" in self_test.check_events(good[:-1], steps=2)
    assert "not 3" in self_test.check_events(good, steps=3)
    assert "'started'" in self_test.check_events([], steps=2)


def test_a_failing_engine_makes_the_self_test_fail(monkeypatch, capsys):
    monkeypatch.setattr(self_test, "run_engine", lambda: ([], "the engine exited with status 1: boom"))
    assert self_test.main() == 1
    out = capsys.readouterr().out
    assert "engine:       FAILED: the engine exited with status 1: boom" in out and "FAILED in" in out


def test_a_broken_app_module_is_reported(monkeypatch, tmp_path):
    broken = tmp_path / "app_broken_probe.py"
    broken.write_text("raise ImportError('missing piece')\n")
    import app
    monkeypatch.setattr(app, "__path__", [*app.__path__, str(tmp_path)])
    problems = self_test.check_imports()
    assert problems == ["app.app_broken_probe: ImportError: missing piece"]


@pytest.mark.slow
def test_self_test_runs_the_engine_without_a_display(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    proc = subprocess.run([sys.executable, "-m", "app.main", "--self-test"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "app modules:  ok" in proc.stdout
    assert "engine:       ok (4 demo steps on cpu" in proc.stdout and "PASSED" in proc.stdout
    # The throwaway data folder is gone and the user's data folder was not touched.
    assert not any(Path(os.environ["MODRON_DATA_DIR"]).glob("runs/*"))
