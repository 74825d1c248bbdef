"""Chaos (issue 11): SIGKILL the worker 21 times over one run, at random moments and in the middle of
checkpoint writes and of pruning. Each kill loses at most one checkpoint interval, no damaged checkpoint
is ever left, and the run finishes with the very weights of a run that was never killed."""
import random
import signal
import time
from collections import deque

import torch
from safetensors.torch import load_file

from helpers import engine_job
from test_worker import Worker
from training_core import checkpoint as ckpt_io
from training_core.config import JobSpec
from training_core.engine import Engine

KILLS = 20
EVERY = 3          # checkpoint interval (steps)
STEPS = 200
SPARES = 2       # workers importing ahead of the session that runs


def _debris(run_dir):
    root = ckpt_io.checkpoints_dir(run_dir)
    names = [p.name for p in root.iterdir()] if root.is_dir() else []
    return {"write": any(n.startswith(ckpt_io.TMP_PREFIX) for n in names),
            "prune": any(n.startswith(ckpt_io.TRASH_PREFIX) for n in names)}


def _wait_for_folder(w, run_dir, prefix, timeout=5.0):
    """Until a folder named prefix* shows in the checkpoints folder (a save or a deletion under way)."""
    root = ckpt_io.checkpoints_dir(run_dir)
    end = time.monotonic() + timeout
    while time.monotonic() < end and w.proc.poll() is None:
        if root.is_dir() and any(p.name.startswith(prefix) for p in root.iterdir()):
            return True
        time.sleep(0.003)
    return False


def _kill_once(w, kill, rng, run_dir):
    """One session: started, then SIGKILL at this kill's kind of moment; checks what it left behind and
    returns (moment, steps lost, debris found)."""
    w.wait_for(lambda e: e["type"] == "started", timeout=180)
    moment = ("random", "write", "prune")[kill % 3]
    if moment == "write":
        _wait_for_folder(w, run_dir, ckpt_io.TMP_PREFIX)
        time.sleep(rng.uniform(0, 0.1))
    elif moment == "prune":
        _wait_for_folder(w, run_dir, ckpt_io.TRASH_PREFIX)
    else:
        time.sleep(rng.uniform(0.0, 1.0))
    assert w.proc.poll() is None, f"the run ended before kill {kill + 1}: {w.all[-1:]}"
    w.proc.send_signal(signal.SIGKILL)
    w.finish()

    seen = [e["step"] for e in w.all if e["type"] in ("step", "checkpoint")]
    reported = [e["step"] for e in w.all if e["type"] == "checkpoint"]
    for ckpt in ckpt_io.list_checkpoints(run_dir):   # nothing named ckpt-* is ever damaged
        assert ckpt_io.problem(ckpt) is None, (kill, ckpt, ckpt_io.problem(ckpt))
    latest = ckpt_io.latest(run_dir)
    kept = ckpt_io.read_manifest(latest)["step"] if latest else 0
    assert kept >= max(reported, default=0)          # a checkpoint once reported is never lost
    lost = max(seen, default=kept) - kept
    assert lost <= EVERY, (kill, seen[-3:], kept)     # at most one interval lost per kill
    return moment, lost, _debris(run_dir)


def test_sigkill_at_random_moments_loses_at_most_one_interval_per_kill(tmp_path):
    rng = random.Random(11)
    base = engine_job(tmp_path, "chaos", steps=STEPS, batch_size=4, seq_len=32, checkpoint_every=EVERY,
                      keep_checkpoints=2, sample_max_tokens=2, eval_fraction=0.05, job_id="chaos0000001")
    run_dir = tmp_path / "chaos"
    spec_path = tmp_path / "chaos.json"
    JobSpec(**base, test_sleep_per_step=0.02, test_sleep_in_checkpoint=0.1).save(spec_path)

    t0 = time.monotonic()
    report = []   # (moment, steps lost, debris found)
    # Each session runs in a spare worker that imported the engine while the sessions before it ran, as
    # the app's queue hands jobs to spares: the kills are the same, the imports no longer queue up.
    spares = deque(Worker(None) for _ in range(SPARES))
    try:
        for kill in range(KILLS):
            w = spares.popleft()
            spares.append(Worker(None))
            w.assign(spec_path, resume=kill > 0)
            report.append(_kill_once(w, kill, rng, run_dir))
        # The last session runs undisturbed to the end (no test sleeps, so it is quick).
        JobSpec(**{**base, "checkpoint_every": 1000}).save(spec_path)
        w = spares.popleft()
        w.assign(spec_path, resume=True)
        assert w.finish(timeout=300) == 0, w.stderr()[-2000:]
    finally:
        for spare in spares:
            spare.proc.kill()
            spare.proc.wait()
    assert w.all[-1]["type"] == "finished" and w.all[-1]["step"] == STEPS
    warnings = [e for e in w.all if e["type"] == "warning" and e["code"] == "debris"]
    elapsed = time.monotonic() - t0

    assert len(report) >= 20
    assert sum(r[2]["write"] for r in report) >= 3, report   # some kills did land mid-write ...
    assert sum(r[2]["prune"] for r in report) >= 3, report   # ... and some mid-deletion
    for p in ckpt_io.checkpoints_dir(run_dir).iterdir():     # the debris is gone, every checkpoint whole
        assert p.name.startswith(ckpt_io.PREFIX) and ckpt_io.problem(p) is None, p
    if report[-1][2]["write"] or report[-1][2]["prune"]:
        assert warnings, "the last kill's debris was cleared without a word"

    # The same weights as a run never killed (same data order, same RNG, restored each time).
    ref_spec = JobSpec(**{**base, "out": str(tmp_path / "ref"), "checkpoint_every": 1000, "job_id": "reference"})
    Engine(ref_spec, lambda e: None).run()
    a = load_file(str(ckpt_io.latest(tmp_path / "ref") / "model" / "model.safetensors"))
    b = load_file(str(ckpt_io.latest(run_dir) / "model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    print(f"\nchaos: {len(report)} kills in {elapsed:.0f} s; steps lost per kill: "
          f"max {max(r[1] for r in report)}, mean {sum(r[1] for r in report) / len(report):.1f}; "
          f"kills that left a half-written checkpoint: {sum(r[2]['write'] for r in report)}, "
          f"a half-deleted one: {sum(r[2]['prune'] for r in report)}")
