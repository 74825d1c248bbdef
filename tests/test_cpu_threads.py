"""The CPU thread count follows the cores other programs leave free (training_core/cpu_threads.py)."""
from __future__ import annotations

import torch

from training_core import cpu_threads
from training_core.cpu_threads import ThreadGovernor, threads_for
from helpers import engine_job
from training_core.config import JobSpec
from training_core.engine import Engine


def test_threads_leave_every_core_others_use():
    assert threads_for(4, 0.0) == 4
    assert threads_for(4, 0.2) == 4        # an idle desktop's few percent cost nothing
    assert threads_for(4, 0.4) == 3        # a video tab: one core left to it
    assert threads_for(4, 1.0) == 3
    assert threads_for(4, 1.3) == 2
    assert threads_for(2, 1.9) == 1
    assert threads_for(2, 7.0) == 1        # never below one thread


class FakeMachine:
    """Clock and CPU-second counters a test drives: `others` CPUs busy besides our `own`."""

    def __init__(self):
        self.t = self.busy_s = self.own_s = 0.0

    def run(self, seconds: float, own: float, others: float) -> None:
        self.t += seconds
        self.own_s += own * seconds
        self.busy_s += (own + others) * seconds


def test_governor_gives_a_core_up_while_another_program_uses_it_and_takes_it_back():
    m, calls = FakeMachine(), []
    gov = ThreadGovernor(2, calls.append, interval_s=2.0, clock=lambda: m.t, busy=lambda: m.busy_s,
                         own=lambda: m.own_s)
    m.run(1.0, own=2.0, others=0.0)
    assert gov.tick() is None                       # not an interval yet
    m.run(1.5, own=2.0, others=0.05)
    assert gov.tick() is None and gov.threads == 2  # quiet machine: both cores
    m.run(2.0, own=1.0, others=1.0)                 # a game starts and takes a core
    assert gov.tick() == 1 and calls == [1]
    m.run(2.0, own=1.0, others=1.0)
    assert gov.tick() is None                       # still there: no change, no call
    m.run(2.0, own=1.0, others=0.0)                 # it ends
    assert gov.tick() == 2 and calls == [1, 2]
    assert gov.changes == 2


def test_a_cpu_run_without_threads_follows_the_load_and_one_with_threads_keeps_them(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    seen: list[int] = []
    monkeypatch.setattr(cpu_threads, "INTERVAL_S", 0.0)
    monkeypatch.setattr(cpu_threads, "threads_for", lambda most, others: 1)   # "another program took a core"
    real_set = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real_set(n)))
    try:
        real_set(2)   # as in a fresh 2-core worker (earlier tests in this process may have left 1)
        Engine(JobSpec(**engine_job(tmp_path, "free", steps=3, threads=None)), lambda e: None).run()
        assert 1 in seen                                    # the loop gave the core up
        seen.clear()
        Engine(JobSpec(**engine_job(tmp_path, "fixed", steps=3, threads=2)), lambda e: None).run()
        assert seen and set(seen) == {2}                    # --threads 2: set up once, never changed
    finally:
        real_set(before)
