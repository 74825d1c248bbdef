"""CPU training when another program takes a core: all cores vs one core left free vs the governor.

Trains the same engine run (scratch preset, generated text, fp32 on the CPU) three ways, one after
another in this process: `--threads` = all physical cores (torch's own default, what the engine did
before issue 15), all cores but one, and no `--threads` (the engine's ThreadGovernor,
training_core/cpu_threads.py). Each run trains `--quiet-steps` steps on the machine as it is, then
starts `--spinners` processes that each keep one core busy (a game, a video call, a compile) and
trains `--busy-steps` more. Reported per mode: the median seconds per step in each half (from the
engine's own `step` events) and the mean over the busy half (that one includes the governor's
reaction, up to 2 s).

    .venv/bin/python bench/cpu_threads.py                 # ~3 min on 2 cores
    .venv/bin/python bench/cpu_threads.py --preset tiny --quiet-steps 40 --busy-steps 60

Prints one JSON line, then readable lines. Goal (issue 15, "a thread count that leaves the desktop
usable"): the governor's busy half close to the best fixed count's, and its quiet half close to all
cores'.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.engine_throughput import OtherCPU, write_text  # noqa: E402

SPIN = "while True: pass"


def per_step(marks: dict[int, float], lo: int, hi: int) -> list[float]:
    """Seconds per step for every step in (lo, hi], from the step events' times (an interval of k
    steps counts k times)."""
    steps = sorted(s for s in marks if lo <= s <= hi)
    out: list[float] = []
    for a, b in zip(steps, steps[1:]):
        out += [(marks[b] - marks[a]) / (b - a)] * (b - a)
    return out


def run_mode(label: str, threads: int | None, args, data: Path, tmp: Path, physical: int) -> dict:
    import torch
    from training_core.config import JobSpec
    from training_core.engine import Engine
    torch.set_num_threads(physical)   # the governor starts from torch's own count, as in a fresh worker
    total = args.quiet_steps + args.busy_steps
    spec = JobSpec(model=f"scratch:{args.preset}", data=[str(data)], out=str(tmp / label), steps=total,
                   batch_size=args.batch_size, seq_len=args.seq_len, lr=3e-4, warmup_steps=2, precision="fp32",
                   device="cpu", threads=threads, tokenizer="bytes", eval_fraction=0.0, checkpoint_every=10**9,
                   sample_prompts=[], gradient_checkpointing=False)
    marks: dict[int, float] = {}
    spinners: list[subprocess.Popen] = []
    seen_threads: list[tuple[int, int]] = []

    def emit(ev: dict) -> None:
        if ev["type"] != "step":
            return
        marks[ev["step"]] = time.perf_counter()
        seen_threads.append((ev["step"], torch.get_num_threads()))
        if ev["step"] >= args.quiet_steps and not spinners:
            spinners.extend(subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.spinners))
    other = OtherCPU()
    try:
        Engine(spec, emit).run()
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    shutil.rmtree(tmp / label, ignore_errors=True)
    busy_from = min(s for s in marks if s >= args.quiet_steps)
    quiet = per_step(marks, 3, busy_from)
    busy = per_step(marks, busy_from, total)
    return {"mode": label, "threads": threads, "quiet_median_s": statistics.median(quiet),
            "busy_median_s": statistics.median(busy), "busy_mean_s": statistics.fmean(busy),
            "threads_seen": sorted({t for _, t in seen_threads}),
            "other_processes_cpus": other.read()}


def main(argv: list[str] | None = None) -> int:
    import psutil
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mini")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--quiet-steps", type=int, default=30)
    p.add_argument("--busy-steps", type=int, default=40)
    p.add_argument("--spinners", type=int, default=1, help="processes each keeping one core busy")
    args = p.parse_args(argv)
    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    modes = [("all cores", physical), ("one core left free", max(1, physical - 1)), ("governor", None)]
    with tempfile.TemporaryDirectory(prefix="modron-threads-") as t:
        tmp = Path(t)
        os.environ.setdefault("MODRON_CACHE_DIR", str(tmp / "cache"))
        data = tmp / "text.txt"
        write_text(data, 300_000)
        results = [run_mode(label, threads, args, data, tmp, physical) for label, threads in modes]
    base = results[0]
    for r in results:
        r["quiet_vs_all"] = round(base["quiet_median_s"] / r["quiet_median_s"], 3)
        r["busy_vs_all"] = round(base["busy_median_s"] / r["busy_median_s"], 3)
    print(json.dumps({"bench": "cpu_threads", "preset": args.preset, "physical_cores": physical,
                      "spinners": args.spinners, "results": results}))
    print(f"scratch:{args.preset}, batch {args.batch_size} x {args.seq_len}, {physical} physical cores; "
          f"{args.spinners} spinning process(es) from step {args.quiet_steps}")
    print(f"{'mode':<20} {'quiet s/step':>12} {'busy s/step':>12} {'busy mean':>10} {'speed busy vs all':>18}"
          f" {'threads':>8} {'others':>7}")
    for r in results:
        print(f"{r['mode']:<20} {r['quiet_median_s']:>12.3f} {r['busy_median_s']:>12.3f} {r['busy_mean_s']:>10.3f} "
              f"{r['busy_vs_all']:>17.2f}x {','.join(map(str, r['threads_seen'])):>8} {r['other_processes_cpus']:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
