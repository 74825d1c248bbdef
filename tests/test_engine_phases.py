"""The worker says what it is doing from the first second: `phase` events (issue 12, part 4)."""
import os
import time

import pytest

from helpers import engine_job, write_text_dataset
from test_worker import Worker, write_spec
from training_core.config import JobSpec
from training_core.engine import EMIT_INTERVAL_S, Engine
from training_core.protocol import EVENTS, PHASES


@pytest.fixture(scope="module")
def run_events(tmp_path_factory):
    """One tiny real run as the app starts it (`run --spec`), several data files, periodic and final
    checkpoints: every event it sent, with the time each line arrived."""
    tmp = tmp_path_factory.mktemp("phases")
    home = tmp_path_factory.mktemp("phases-home")
    files = []
    for i in range(3):
        path = tmp / f"part{i}.txt"
        write_text_dataset(path, n_paragraphs=40, seed=i)
        files.append(str(path))
    with pytest.MonkeyPatch.context() as mp:   # the autouse isolation is per test; this is per module
        mp.setenv("MODRON_DATA_DIR", str(home / "data"))
        mp.setenv("MODRON_CACHE_DIR", str(home / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        w = Worker(write_spec(tmp, "phases", data=files, steps=8, seq_len=32, checkpoint_every=4, eval_every=2))
        assert w.finish(timeout=300) == 0, w.stderr()
    assert w.all[-1]["type"] == "finished", w.all[-3:]
    return w.all


def phases(events):
    return [e for e in events if e["type"] == "phase"]


def test_the_first_line_is_a_phase_and_set_up_is_told_in_order(run_events):
    first = run_events[0]
    assert first["type"] == "phase" and first["phase"] == "loading_model" and first["message"]
    types = [e["type"] for e in run_events]
    started = types.index("started")
    assert types.index("step") > started
    before = [e["phase"] for e in phases(run_events[:started])]
    assert before[0] == "loading_model" and {"tokenizing", "placing"} <= set(before)
    order = [PHASES.index(p) for p in before]
    assert order == sorted(order), before   # loading, tokenizing, placing: never back
    for e in phases(run_events):
        assert e["phase"] in PHASES and all(f in e for f in EVENTS["phase"]) and e["message"].strip()


def test_tokenizing_carries_its_progress(run_events):
    tok = [e for e in phases(run_events) if e["phase"] == "tokenizing"]
    assert tok and all(e["unit"] == "bytes" and 0 <= e["done"] <= e["total"] for e in tok)
    assert tok[-1]["done"] == tok[-1]["total"] > 0
    assert [e["done"] for e in tok] == sorted(e["done"] for e in tok)


def test_the_loop_says_first_step_training_evaluating_checkpointing_finishing(run_events):
    seq = [(e["type"], e.get("phase"), e.get("reason")) for e in run_events]
    first_step = seq.index(("phase", "first_step", None))
    assert seq.index(("started", None, None)) < first_step < [t for t, _, _ in seq].index("step")
    assert ("phase", "training", None) in seq and ("phase", "evaluating", None) in seq
    final_ckpt = seq.index(("checkpoint", None, "final"))
    writing = [i for i, e in enumerate(run_events) if e.get("phase") == "checkpointing"]
    assert any(i < final_ckpt and "final" in run_events[i]["message"] for i in writing)
    assert len(writing) == seq.count(("checkpoint", None, "periodic")) + 1 == 2   # step 4, then the final one
    last_phase = phases(run_events)[-1]
    assert last_phase["phase"] == "finishing" and seq.index(("phase", "finishing", None)) < len(seq) - 1


def test_phase_events_do_not_flood(run_events):
    ph = phases(run_events)
    for a, b in zip(ph, ph[1:]):   # progress within a phase: at most ~4 a second, plus its end
        if (a["phase"], a["message"]) == (b["phase"], b["message"]):
            assert b["done"] != a["done"], (a, b)
            assert b["time"] - a["time"] >= 0.9 * EMIT_INTERVAL_S or b["done"] == b["total"], (a, b)
    # changes: a few in set-up, then about one per eval or checkpoint and one back to training
    things = sum(1 for e in run_events if e["type"] in ("eval", "checkpoint"))
    assert len(ph) <= 10 + 3 * things, [(e["phase"], e.get("done")) for e in ph]


def test_progress_within_a_phase_is_sent_at_most_four_times_a_second(tmp_path):
    events = []
    engine = Engine(JobSpec(**engine_job(tmp_path)), events.append)   # nothing set up: phase() alone
    t0 = time.monotonic()
    for done in range(0, 100_001, 10):
        engine.phase("tokenizing", "Tokenizing the data…", done, 100_000, "bytes")
    took = time.monotonic() - t0
    sent = [e["done"] for e in events]
    assert sent[0] == 0 and sent[-1] == 100_000   # the start and the end always
    assert len(sent) <= 2 + took / EMIT_INTERVAL_S + 1, (len(sent), took)
    n = len(events)
    engine.phase("tokenizing", "Tokenizing the data…", 100_000, 100_000, "bytes")   # the end, said again
    assert len(events) == n
    engine.phase("placing", "Placing the model on cpu…")
    engine.phase("placing", "Placing the model on cpu…")
    assert len(events) == n + 1 and events[-1]["phase"] == "placing"   # a change at once, a repeat never

    n, t0 = len(events), time.monotonic()
    for _ in range(300):   # an eval after every (fast) step: back to training is said 4 times a second at most
        engine.phase("evaluating", "Evaluating on 8 held-out blocks…")
        engine.phase("training", "Training")
    took = time.monotonic() - t0
    assert len(events) - n <= 2 + 2 * (took / EMIT_INTERVAL_S + 1), (len(events) - n, took)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the worker test helpers are POSIX")
def test_a_stopped_set_up_says_its_phase_first(tmp_path):
    """Even a run stopped while it loads has told what it was doing before `stopped`."""
    w = Worker(write_spec(tmp_path, "slow", steps=4, seq_len=32, test_sleep_in_setup=60))
    w.wait_for(lambda e: e["type"] == "phase" and "run folder" in e["message"])
    w.send("stop")
    assert w.finish(timeout=30) == 0, w.stderr()
    assert w.all[0]["type"] == "phase" and w.all[-1]["type"] == "stopped"


def test_the_loop_trains_with_the_threads_asked_for_though_set_up_ran_in_its_own_thread(tmp_path):
    """torch.set_num_threads holds per thread with OpenMP: set-up's helper thread setting it is not enough."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = Engine(JobSpec(**engine_job(tmp_path, steps=2, seq_len=32, threads=1)), lambda e: None).run()
        assert result.status == "finished" and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_plain_cli_output_tells_set_up_then_only_steps(run_events):
    """`modron-train finetune` without --json (TextProgress): on a terminal, set-up's phases are lines of
    their own until the first step, so a slow load never looks hung; after it, no phase line comes. In a
    log or a pipe, none (bad input stays one line of stderr)."""
    import io

    from training_core.textout import TextProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    first_step = next(i for i, e in enumerate(run_events) if e["type"] == "step")
    set_up = list(dict.fromkeys(e["message"] for e in phases(run_events[:first_step]) if e["phase"] != "training"))
    later = {e["message"] for e in phases(run_events)} - set(set_up)
    for stream, shown_before in ((Terminal(), set_up), (io.StringIO(), [])):
        show = TextProgress(stream)
        for ev in run_events:
            show(ev)
        text = stream.getvalue()
        before, _, after = text.partition("step 1/")
        assert after, text
        lines = [line.strip("\r") for line in before.splitlines()]
        assert [line for line in lines if line in set_up] == shown_before, (lines, set_up)
        assert not any(message in after for message in later | set(set_up)), after
