"""The built-in demo job: the tiny preset on the bundled CC0 stories, about a minute on 2 CPU cores.

Imports nothing heavy, so the desktop app can build the spec too.
"""
from __future__ import annotations

import time

from .config import JobSpec


def demo_spec(out: str | None = None) -> JobSpec:
    import resources
    from .paths import runs_dir
    out = out or str(runs_dir() / time.strftime("demo-%Y%m%d-%H%M%S"))
    return JobSpec(model="scratch:tiny", data=[str(resources.path("demo", "stories"))], out=out,
                   steps=150, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=10, checkpoint_every=75,
                   eval_every=25, tokenizer="train", sample_prompts=["Once upon a time", "The fox said"],
                   sample_max_tokens=30)
