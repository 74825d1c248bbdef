"""The worker subprocess: protocol lines, controls, SIGKILL and resume, clean failures."""
import signal
import subprocess
import sys
import threading
import queue
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from helpers import engine_job
from training_core import checkpoint as ckpt_io
from training_core.config import JobSpec
from training_core.protocol import decode_event, encode, make_control

ROOT = Path(__file__).resolve().parents[1]


class Worker:
    """A real worker process, spawned like the app spawns it."""

    def __init__(self, spec_path: Path | None, resume: bool = False):
        """spec_path None: a spare worker (`run --spare`), which imports the engine and waits for assign()."""
        job = ["--spec", str(spec_path)] + (["--resume"] if resume else []) if spec_path is not None else ["--spare"]
        cmd = [sys.executable, "-m", "training_core.cli", "run"] + job
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, encoding="utf-8")
        self.events: "queue.Queue[dict]" = queue.Queue()
        self.all: list[dict] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            ev = decode_event(line)  # every stdout line must be a protocol event
            self.all.append(ev)
            self.events.put(ev)

    def assign(self, spec_path: Path, resume: bool = False):
        """A spare's job, as the app hands it over (its `job` control)."""
        self.proc.stdin.write(encode(make_control("job", spec=str(spec_path), resume=resume)))
        self.proc.stdin.flush()

    def send(self, kind):
        self.proc.stdin.write(encode(make_control(kind)))
        self.proc.stdin.flush()

    def wait_for(self, pred, timeout=120):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                ev = self.events.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None and self.events.empty():
                    break
                continue
            if pred(ev):
                return ev
        raise AssertionError(f"event not seen; last events: {self.all[-5:]}; stderr: {self.stderr()[-2000:]}")

    def stderr(self):
        if self.proc.poll() is None:
            return ""
        return self.proc.stderr.read()

    def finish(self, timeout=120):
        rc = self.proc.wait(timeout=timeout)
        time.sleep(0.2)
        return rc


def write_spec(tmp_path, name, **kw):
    path = tmp_path / f"{name}.json"
    JobSpec(**engine_job(tmp_path, name, **dict(dict(steps=16), **kw))).save(path)
    return path


def test_worker_obeys_pause_resume_checkpoint_stop(tmp_path):
    w = Worker(write_spec(tmp_path, "ctl", steps=500, test_sleep_per_step=0.02))
    w.wait_for(lambda e: e["type"] == "step")
    w.send("pause")
    paused = w.wait_for(lambda e: e["type"] == "paused")
    assert Path(paused["checkpoint"]).is_dir() and paused["vram_used"] == 0
    w.send("resume")
    resumed = w.wait_for(lambda e: e["type"] == "resumed")
    assert resumed["step"] == paused["step"]
    w.wait_for(lambda e: e["type"] == "step" and e["step"] > paused["step"])
    w.send("checkpoint")
    ck = w.wait_for(lambda e: e["type"] == "checkpoint" and e["reason"] == "requested")
    assert (Path(ck["path"]) / "modron_checkpoint.json").is_file()
    w.proc.stdin.write("this is not json\n")
    w.proc.stdin.flush()
    w.wait_for(lambda e: e["type"] == "warning" and e["code"] == "bad_control")
    w.send("stop")
    stopped = w.wait_for(lambda e: e["type"] == "stopped")
    assert w.finish() == 0
    assert stopped["step"] < 500
    assert not any(e["type"] == "finished" for e in w.all)


def test_sigkill_mid_training_resumes_and_matches_an_uninterrupted_run(tmp_path):
    ref = Worker(write_spec(tmp_path, "ref", steps=16))
    assert ref.finish() == 0, ref.stderr()
    assert ref.all[-1]["type"] == "finished"

    spec = write_spec(tmp_path, "killed", steps=16, checkpoint_every=4, test_sleep_per_step=0.15)
    w = Worker(spec)
    w.wait_for(lambda e: e["type"] == "checkpoint" and e["step"] == 8)
    w.wait_for(lambda e: e["type"] == "step" and e["step"] >= 10)
    w.proc.send_signal(signal.SIGKILL)
    w.finish()
    run_dir = tmp_path / "killed"
    assert ckpt_io.latest(run_dir).name == "ckpt-00000008"   # steps 9-10 are lost, nothing before

    again = Worker(spec, resume=True)
    assert again.finish() == 0, again.stderr()
    started = next(e for e in again.all if e["type"] == "started")
    assert started["resumed_from"] == 8
    assert again.all[-1]["type"] == "finished" and again.all[-1]["step"] == 16
    for p in (run_dir / "checkpoints").iterdir():   # nothing half-written is left behind
        assert p.name.startswith("ckpt-") and (p / "modron_checkpoint.json").is_file()
    a = load_file(str(ckpt_io.latest(tmp_path / "ref") / "model" / "model.safetensors"))
    b = load_file(str(ckpt_io.latest(run_dir) / "model" / "model.safetensors"))
    for k in a:  # same data order, same RNG: the same model
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_worker_reports_bad_data_as_one_line_and_exit_2(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    w = Worker(write_spec(tmp_path, "bad", data=[str(empty)]))
    rc = w.finish()
    failed = w.all[-1]
    assert rc == 2 and failed["type"] == "failed" and failed["code"] == "bad_data"
    assert "empty.txt" in failed["message"] and "\n" not in failed["message"]
    assert "Traceback" not in w.stderr()


def test_worker_stdout_carries_only_protocol_lines_even_if_a_library_prints(tmp_path):
    # A library print() during training must not corrupt the event stream.
    code = ("import sys, builtins; sys.argv=['modron-train','run','--spec',%r];"
            "import training_core.cli as w; orig=w.main;"
            "print('noise before main');"
            "import training_core.engine as e; real=e.Engine._setup;"
            "e.Engine._setup=lambda self: (print('noise from a library'), real(self))[1];"
            "sys.exit(orig())") % str(write_spec(tmp_path, "noisy", steps=3))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = proc.stdout.splitlines()
    assert lines[0] == "noise before main"   # printed before the worker took stdout over
    events = [decode_event(l) for l in lines[1:]]
    assert events[-1]["type"] == "finished"
    assert "noise from a library" in proc.stderr
