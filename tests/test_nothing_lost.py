"""Nothing lost, nothing mixed up (issue 11): run folders that belong to one job, diverging runs, absurd
models, relative paths, the user's own disk trouble as exit 2, debris of killed saves and pruning."""
import errno
import json
import os
import signal
import time
from pathlib import Path

import pytest

from helpers import engine_job, make_local_model
from test_worker import Worker, write_spec
from training_core import checkpoint as ckpt_io
from training_core import cli
from training_core.config import JobSpec
from training_core.engine import Engine
from training_core.errors import ConfigError


@pytest.fixture
def run_cli(capfd):
    """`modron-train` in this process (the imports are paid once); its signal handlers are put back after."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def run(*args):
        code = cli.main([str(a) for a in args])
        out, err = capfd.readouterr()
        return code, out, err
    yield run
    for s, handler in saved.items():
        signal.signal(s, handler)


def last_line(err: str) -> str:
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def tiny_args(tmp_path, out, *extra):
    spec = engine_job(tmp_path, "unused")
    return ["finetune", "--model", "scratch:tiny", "--data", spec["data"][0], "--out", out, "--seq-len", 32,
            "--batch-size", 4, "--tokenizer", "bytes", "--threads", 1, *extra]


def engine_run(spec: JobSpec, resume=False):
    events = []
    result = Engine(spec, events.append, resume=resume).run()
    return result, events


# ---- 1. a run folder belongs to its job -------------------------------------------------------
def test_a_run_folder_of_another_job_is_refused(tmp_path):
    first = JobSpec(**engine_job(tmp_path, "shared", steps=4, checkpoint_every=2, seq_len=32))
    engine_run(first)
    assert json.loads((tmp_path / "shared" / "job.json").read_text())["job_id"] == first.job_id

    other = JobSpec(**engine_job(tmp_path, "shared", steps=4, seq_len=32))   # a new job, same folder
    assert other.job_id != first.job_id
    for resume in (False, True):
        with pytest.raises(ConfigError, match="belongs to another job"):
            engine_run(other, resume=resume)
    # job.json lost: the checkpoints still say whose they are
    (tmp_path / "shared" / "job.json").unlink()
    with pytest.raises(ConfigError, match="belongs to another job"):
        engine_run(other, resume=True)
    # the owner itself goes on
    result, events = engine_run(first, resume=True)
    assert result.status == "finished"


def test_a_second_process_on_the_same_run_folder_is_refused(tmp_path):
    from training_core.engine import _lock_folder
    held = _lock_folder(tmp_path)   # what a training process holds while it runs
    with pytest.raises(ConfigError, match="in use by another Modron training process"):
        _lock_folder(tmp_path)
    held.close()                    # it ended (or was killed: the kernel lets go of the lock)
    _lock_folder(tmp_path).close()


# ---- 3. a diverging run stops cleanly, or goes back with a lower learning rate -----------------
def test_lr_inf_is_refused_and_a_diverging_run_stops_with_exit_2(tmp_path, run_cli):
    code, _, err = run_cli(*tiny_args(tmp_path, tmp_path / "inf", "--steps", 3, "--lr", "inf"))
    assert code == 2 and "--lr: must be a finite number" in last_line(err)

    out = tmp_path / "diverged"
    code, _, err = run_cli(*tiny_args(tmp_path, out, "--steps", 6, "--lr", "1e3", "--checkpoint-every", 1))
    line = last_line(err)
    assert code == 2, err
    assert "training diverged" in line and "lower learning rate" in line and f"resume {out}" in line
    assert "internal error" not in err
    for ckpt in ckpt_io.list_checkpoints(out):   # what is kept is good
        assert ckpt_io.problem(ckpt) is None
        from safetensors.torch import load_file
        import torch
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "model" / "model.safetensors")).values())


def test_diverged_worker_fails_with_a_suggestion_then_resumes_with_a_lower_lr(tmp_path, run_cli):
    path = write_spec(tmp_path, "nan", steps=10, checkpoint_every=2, seq_len=32, test_nan_at_steps=[5])
    w = Worker(path)
    assert w.finish() == 2
    failed = w.all[-1]
    assert failed["type"] == "failed" and failed["code"] == "diverged", failed
    assert failed["suggested_lr"] == pytest.approx(1e-3) and failed["checkpoint"].endswith("ckpt-00000004")
    assert "step 4" in failed["message"] and "lower learning rate" in failed["message"]
    run_dir = tmp_path / "nan"
    assert [p.name for p in ckpt_io.list_checkpoints(run_dir)][-1] == "ckpt-00000004"
    assert not any(e["type"] == "checkpoint" and e["step"] > 4 for e in w.all)

    spec = JobSpec.load(run_dir / "job.json")   # the hook has done its job
    spec.test_nan_at_steps = []
    spec.save(run_dir / "job.json")
    code, _, err = run_cli("resume", run_dir, "--lr", failed["suggested_lr"])
    assert code == 0, err
    assert "resumed at step 4" in err and "learning rate 0.003 -> 0.001" in err
    assert JobSpec.load(run_dir / "job.json").lr == pytest.approx(1e-3)
    state = ckpt_io.read_json(ckpt_io.latest(run_dir), "trainer_state.json")
    assert state["step"] == 10 and state["scheduler"]["base_lrs"] == [pytest.approx(1e-3)]


def test_on_divergence_lower_lr_goes_back_to_the_last_good_checkpoint(tmp_path):
    spec = JobSpec(**engine_job(tmp_path, "back", steps=8, checkpoint_every=2, seq_len=32, test_nan_at_steps=[5],
                                on_divergence="lower_lr"))
    result, events = engine_run(spec)
    assert result.status == "finished" and result.step == 8
    warning = next(e for e in events if e["type"] == "warning" and e["code"] == "diverged")
    assert "going back to step 4" in warning["message"] and "0.001" in warning["message"]
    started = [e for e in events if e["type"] == "started"]
    assert [s["resumed_from"] for s in started] == [None, 4]
    assert JobSpec.load(tmp_path / "back" / "job.json").lr == pytest.approx(1e-3)


# ---- 4. an absurd model is refused from its config; stop works while loading -------------------
@pytest.mark.parametrize("shape", [dict(hidden_size=10 ** 9, intermediate_size=10 ** 9, num_hidden_layers=10 ** 6),
                                   dict(hidden_size=10 ** 9)])
def test_absurd_model_config_is_refused_in_seconds(tmp_path, run_cli, shape):
    folder = make_local_model(tmp_path / "absurd")
    config = json.loads((folder / "config.json").read_text())
    config.update(shape)
    (folder / "config.json").write_text(json.dumps(config))
    t0 = time.monotonic()
    code, _, err = run_cli("finetune", "--model", folder, "--data", engine_job(tmp_path)["data"][0],
                           "--out", tmp_path / "run", "--steps", 2, "--seq-len", 32)
    took = time.monotonic() - t0
    line = last_line(err)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "config.json" in line and "needs at least" in line and "choose a smaller model" in line
    assert took < 20, took
    code, _, err = run_cli("plan", "--model", folder, "--data", engine_job(tmp_path)["data"][0])
    assert code == 2 and "needs at least" in last_line(err)


@pytest.mark.parametrize("how", ["sigterm", "stop control"])
def test_stop_during_set_up_ends_it_at_once(tmp_path, how):
    w = Worker(write_spec(tmp_path, "slow", steps=4, seq_len=32, test_sleep_in_setup=120))
    job_json = tmp_path / "slow" / "job.json"
    deadline = time.monotonic() + 120
    while not job_json.exists():   # written first thing in set-up
        assert time.monotonic() < deadline and w.proc.poll() is None, w.stderr()
        time.sleep(0.05)
    t0 = time.monotonic()
    if how == "sigterm":
        w.proc.send_signal(signal.SIGTERM)
    else:
        w.send("stop")
    assert w.finish(timeout=30) == 0, w.stderr()
    assert time.monotonic() - t0 < 15
    stopped = w.all[-1]
    assert stopped["type"] == "stopped" and stopped["step"] == 0 and stopped["checkpoint"] is None


def test_sigterm_anywhere_in_set_up_ends_it_within_seconds(tmp_path):
    """SIGTERM at several points of set-up, heavy imports included: each run ends, `stopped` last, within
    the bound. (It once raised an exception from the signal handler, which a library finaliser running at
    that moment swallowed: the stop was lost and the run went on loading.)"""
    points = {
        "first event (importing torch)": lambda e: True,
        "importing the model libraries": lambda e: e.get("message") == "Loading the model libraries…",
        "sleeping model load, 0.0 s": lambda e: e.get("phase") == "loading_model" and "Building" not in e["message"],
    }
    for n, (where, pred) in enumerate(points.items()):
        w = Worker(write_spec(tmp_path, f"slow{n}", steps=4, seq_len=32, test_sleep_in_setup=60))
        w.wait_for(lambda e: e["type"] == "phase" and pred(e))
        if n == 2:
            time.sleep(1.0)   # inside the (test hook's) slow model load
        t0 = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        assert w.finish(timeout=30) == 0, (where, w.stderr())
        assert time.monotonic() - t0 < 10, where
        assert w.all[-1]["type"] == "stopped" and w.all[-1]["step"] == 0, (where, w.all[-3:])
        assert "StopRequested" not in w.stderr(), where   # never thrown where a library could swallow it


def test_a_resumed_run_stopped_while_it_imports_names_its_newest_checkpoint(tmp_path):
    """docs/protocol.md: a stop during set-up says the run's newest checkpoint and its folder; it once said
    step 0 and no checkpoint when the stop came before the engine's imports were done."""
    spec = write_spec(tmp_path, "held", steps=3, seq_len=32, checkpoint_every=2)
    Engine(JobSpec.load(spec), lambda e: None).run()            # checkpoints at steps 2 and 3
    newest = ckpt_io.latest(tmp_path / "held")
    w = Worker(spec, resume=True)
    w.wait_for(lambda e: e["type"] == "phase")                   # its first line, before importing torch
    w.proc.send_signal(signal.SIGTERM)
    assert w.finish(timeout=30) == 0, w.stderr()
    stopped = w.all[-1]
    assert stopped["type"] == "stopped", w.all[-3:]
    assert stopped["checkpoint"] == str(newest) and stopped["step"] == 3, stopped
    assert stopped["run_dir"] == str(tmp_path / "held")


def test_a_stop_signalled_inside_a_finaliser_is_not_lost():
    """The flake's cause, made certain: the handler runs inside a library's __del__ (here ours). A stop
    raised there would be 'ignored' by Python; the flag it sets is seen by set-up's next check."""
    from training_core.controls import Controls, StopRequested
    controls = Controls()
    old = signal.signal(signal.SIGUSR1, lambda *_: controls.stop())
    try:
        class Finalised:
            def __del__(self):
                signal.raise_signal(signal.SIGUSR1)   # the handler runs here, inside the finaliser
                sum(range(100))
        Finalised()
        with pytest.raises(StopRequested):
            controls.check()
        controls.polling = True   # once the loop reads controls, the same stop is its next message
        assert controls.poll() == "stop" and controls.poll() is None
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_a_stop_ends_the_wait_for_a_set_up_step_at_once():
    """Controls.run_setup: a long library call in a helper thread; a stop ends the wait within a slice."""
    import threading
    from training_core.controls import Controls, StopRequested
    controls = Controls()
    assert controls.run_setup(lambda a, b=0: a + b, 1, b=2) == 3
    with pytest.raises(KeyError):
        controls.run_setup(lambda: {}["missing"])
    release = threading.Event()
    threading.Timer(0.2, controls.stop).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(StopRequested):
            controls.run_setup(release.wait, 30)
        assert time.monotonic() - t0 < 5 and controls.abandoned is not None
    finally:
        release.set()


# ---- 5. paths in job.json are absolute ----------------------------------------------------------
def test_relative_paths_are_stored_absolute_and_resume_works_from_anywhere(tmp_path, run_cli, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    data = Path(engine_job(tmp_path)["data"][0])
    (work / "stories.txt").write_text(data.read_text())
    monkeypatch.chdir(work)
    code, _, err = run_cli("finetune", "--model", "scratch:tiny", "--data", "stories.txt", "--out", "run",
                           "--steps", 2, "--seq-len", 32, "--batch-size", 4, "--tokenizer", "bytes")
    assert code == 0, err
    job = json.loads((work / "run" / "job.json").read_text())
    assert job["data"] == [str(work / "stories.txt")] and job["out"] == str(work / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli("resume", "../work/run")
    assert code == 0, err

    # A job.json from before paths were stored absolute: found from the run folder's own place.
    job.update(data=["stories.txt"], out="run", steps=3)
    (work / "run" / "job.json").write_text(json.dumps(job))
    code, _, err = run_cli("resume", work / "run")
    assert code == 0, err
    assert json.loads((work / "run" / "job.json").read_text())["data"] == [str(work / "stories.txt")]


# ---- 6. the user's situation is exit 2 with one line ---------------------------------------------
def test_out_naming_a_file_and_a_read_only_out_are_exit_2(tmp_path, run_cli, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = run_cli(*tiny_args(tmp_path, afile, "--steps", 2))
    assert code == 2 and "is a file, not a folder" in last_line(err)

    ro = tmp_path / "ro"
    ro.mkdir()
    real_write = Path.write_bytes

    def read_only(self, data):   # root ignores chmod, so the file system's answer is simulated
        if self.parent == ro:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_write(self, data)
    monkeypatch.setattr(Path, "write_bytes", read_only)
    code, _, err = run_cli(*tiny_args(tmp_path, ro, "--steps", 2))
    assert code == 2 and "read-only file system" in last_line(err) and str(ro) in last_line(err), err


def test_symlink_loop_and_damaged_weights_are_exit_2(tmp_path, run_cli):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(Path(engine_job(tmp_path)["data"][0]).read_text())
    os.symlink("loop", data / "loop")
    code, _, err = run_cli("finetune", "--model", "scratch:tiny", "--data", data, "--out", tmp_path / "o1",
                           "--steps", 2, "--seq-len", 32, "--tokenizer", "bytes")
    assert code == 2 and "symlink loop" in last_line(err) and "loop" in last_line(err), err

    folder = make_local_model(tmp_path / "model")
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[8:40] = b"\x00\xff" * 16
    weights.write_bytes(bytes(raw))
    code, _, err = run_cli("finetune", "--model", folder, "--data", data / "a.txt", "--out", tmp_path / "o2",
                           "--steps", 2, "--seq-len", 32)
    assert code == 2 and "model.safetensors: is damaged" in last_line(err), err


def test_disk_full_during_a_checkpoint_is_exit_2_and_leaves_no_partial_folder(tmp_path, run_cli, monkeypatch):
    from safetensors import SafetensorError
    real_save = ckpt_io.save_file
    calls = []

    def filling_up(tensors, path):
        calls.append(path)
        if len(calls) > 2:   # the first checkpoint (optimizer + rng) fits; then the disk is full
            Path(path).write_bytes(b"\0" * 1000)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, path)
    monkeypatch.setattr(ckpt_io, "save_file", filling_up)
    out = tmp_path / "full"
    code, _, err = run_cli(*tiny_args(tmp_path, out, "--steps", 6, "--checkpoint-every", 2))
    line = last_line(err)
    assert code == 2, err
    assert "no space left on the disk" in line and "step 4" in line and "ckpt-00000002, is kept" in line
    names = [p.name for p in (out / "checkpoints").iterdir()]
    assert names == ["ckpt-00000002"] and ckpt_io.problem(out / "checkpoints" / names[0]) is None


# ---- 7. debris, pruning, no checkpoint yet --------------------------------------------------------
def test_pruning_renames_a_checkpoint_away_before_deleting_it(tmp_path, monkeypatch):
    run = tmp_path / "run"
    for step in (2, 4):
        ckpt = ckpt_io.checkpoints_dir(run) / f"ckpt-{step:08d}"
        (ckpt / "model").mkdir(parents=True)
        (ckpt / "model" / "model.safetensors").write_bytes(b"weights")
        (ckpt / "modron_checkpoint.json").write_text(json.dumps({"format": ckpt_io.FORMAT, "version": 1,
                                                                 "step": step, "files": []}))

    def killed(path, ignore_errors=False):   # the process dies as the deletion begins
        raise SystemExit("killed")
    monkeypatch.setattr(ckpt_io.shutil, "rmtree", killed)
    with pytest.raises(SystemExit):
        ckpt_io.prune(run, keep=1)
    names = sorted(p.name for p in ckpt_io.checkpoints_dir(run).iterdir())
    assert names[0].startswith(".trash-ckpt-00000002") and names[1:] == ["ckpt-00000004"]
    monkeypatch.undo()
    assert ckpt_io.clean_debris(run) == [names[0]]
    assert [p.name for p in ckpt_io.checkpoints_dir(run).iterdir()] == ["ckpt-00000004"]


def test_stale_debris_is_cleared_and_a_damaged_newest_checkpoint_is_skipped(tmp_path, run_cli):
    spec = JobSpec(**engine_job(tmp_path, "run", steps=4, checkpoint_every=2, seq_len=32, keep_checkpoints=3))
    engine_run(spec)
    root = ckpt_io.checkpoints_dir(tmp_path / "run")
    (root / ".tmp-ckpt-00000006-99999" / "model").mkdir(parents=True)   # a save killed halfway
    (root / ".trash-ckpt-00000000-99999-abcdef").mkdir()                # a deletion killed halfway
    (root / "ckpt-00000004" / "optimizer.safetensors").write_bytes(b"\xff" * 20)   # bit rot
    result, events = engine_run(JobSpec.load(tmp_path / "run" / "job.json"), resume=True)
    codes = {e["code"]: e["message"] for e in events if e["type"] == "warning"}
    assert "removed 2 unfinished checkpoint folder(s)" in codes["debris"]
    assert "ckpt-00000004" in codes["damaged_checkpoint"] and "optimizer.safetensors is damaged" in codes["damaged_checkpoint"]
    assert next(e for e in events if e["type"] == "started")["resumed_from"] == 2
    assert result.status == "finished"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    assert result.step == 4 and ckpt_io.problem(root / "ckpt-00000004") is None   # written again, whole
    (root / "ckpt-00000004" / "model" / "model.safetensors").write_bytes(b"\x10" * 8)   # truncated
    code, _, err = run_cli("export", root / "ckpt-00000004", "--merged", tmp_path / "merged")
    assert code == 2 and "ckpt-00000004: is damaged (model/model.safetensors is damaged" in last_line(err), err


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(tmp_path, run_cli):
    w = Worker(write_spec(tmp_path, "early", steps=6, seq_len=32, test_sleep_per_step=0.3, checkpoint_every=100))
    w.wait_for(lambda e: e["type"] == "step")
    w.proc.send_signal(signal.SIGKILL)
    w.finish()
    run_dir = tmp_path / "early"
    assert ckpt_io.latest(run_dir) is None and (run_dir / "job.json").is_file()
    spec = JobSpec.load(run_dir / "job.json")
    spec.test_sleep_per_step = 0
    spec.save(run_dir / "job.json")
    code, _, err = run_cli("resume", run_dir)
    assert code == 0, err
    assert "no checkpoint yet, starting from the beginning" in err and "finished: step 6" in err


def test_interruptible_keeps_the_main_thread_answering_signals_during_a_long_call():
    """What lets SIGTERM stop a tokenizer's training (Rust, never back in Python for seconds)."""
    import threading
    from training_core.controls import StopRequested, interruptible
    assert interruptible(lambda a, b=0: a + b, 1, b=2) == 3
    with pytest.raises(KeyError):
        interruptible(lambda: {}["missing"])

    release = threading.Event()
    old = signal.signal(signal.SIGUSR1, lambda *_: (_ for _ in ()).throw(StopRequested()))
    try:
        threading.Timer(0.2, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1)).start()
        t0 = time.monotonic()
        with pytest.raises(StopRequested):
            interruptible(release.wait, 30)   # blocks its helper thread until released
        assert time.monotonic() - t0 < 5
    finally:
        release.set()
        signal.signal(signal.SIGUSR1, old)
