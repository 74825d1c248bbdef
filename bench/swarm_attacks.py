"""Hostile peers against a loopback DiLoCo swarm: what each attack costs the honest peers.

Runs a clean swarm (two honest in-process DiLoCo peers, a small MLP, each peer on its own fixed
stream of batches), then the same swarm under each attack of tests/test_swarm_attacks.py (the
attackers and the swarm are tests/attack_helpers.py's), and prints per attack:

- loss vs clean: the honest peers' final eval loss (the worse of the two) over the clean run's, on
  the same samples (the test's bound: <= 1.10);
- longest stall: the longest time an honest peer applied no outer step, from its first inner step
  to its last (a clean run's is one round: inner steps plus an exchange);
- rounds: outer steps the honest peers applied; named: whether a warning names every attacker.

`--unguarded` runs the value attacks again with robust aggregation off (a plain weighted mean at
every reducer, no check of what reducers return): what the guards are worth, and proof that the
test's bounds can fail.

    .venv/bin/python bench/swarm_attacks.py                              # ~7 min on 2 cores
    .venv/bin/python bench/swarm_attacks.py --attacks noise,x-100 --unguarded
    .venv/bin/python bench/swarm_attacks.py --compression none           # 1e30 and inf arrive as sent
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from attack_helpers import ATTACKS, GRADIENT_ATTACKS, Config, run_attack  # noqa: E402
from bench.engine_throughput import OtherCPU  # noqa: E402

VALUE_ATTACKS = ("noise", "x-100", "1e30", "inf")


def unguard() -> None:
    """Robust aggregation off in every averager made after this (they fork from this process)."""
    import torch
    from training_core.swarm import robust

    def plain_mean(parts, weights, reference=None):
        idx = [i for i, (p, w) in enumerate(zip(parts, weights)) if p is not None and w > 0]
        ys = torch.stack([parts[i].reshape(-1).float() for i in idx])
        w = torch.tensor([float(weights[i]) for i in idx], dtype=torch.float32)
        norms = [None] * len(parts)
        for j, i in enumerate(idx):
            norms[i] = float(torch.linalg.vector_norm(ys[j]))
        return robust.Combined((w / w.sum()) @ ys, [1.0 if i in idx else None for i in range(len(parts))],
                               0.0, norms)
    robust.robust_combine = plain_mean
    robust.RESULT_BOUND = float("inf")


def row(r, clean) -> dict:
    return dict(eval_loss=[round(x, 4) for x in r.eval_loss], loss_vs_clean=round(r.loss / clean.loss, 3),
                longest_stall_s=round(r.longest_stall_s, 1), rounds=r.rounds, finite=r.finite,
                named=all(r.named().values()) if r.attacker else None, blamed_honest=r.blamed_honest(),
                wall_s=round(r.wall_s, 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated, of: {', '.join(ATTACKS)}")
    ap.add_argument("--steps", type=int, default=150,
                    help="inner steps per honest peer (the figures in bench/README.md; the tests run 120)")
    ap.add_argument("--inner-steps", type=int, default=Config.inner_steps)
    ap.add_argument("--step-s", type=float, default=Config.step_s, help="the least time an inner step takes")
    ap.add_argument("--compression", default=Config.compression)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unguarded", action="store_true",
                    help="then run the value attacks again with robust aggregation off")
    args = ap.parse_args(argv)
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        ap.error(f"unknown attack(s) {', '.join(unknown)}; use {', '.join(ATTACKS)}")
    cfg = Config(steps=args.steps, inner_steps=args.inner_steps, step_s=args.step_s,
                 compression=args.compression, seed=args.seed)
    others = OtherCPU()
    t0 = time.monotonic()
    clean = run_attack(None, cfg)
    results = [(a, run_attack(a, cfg)) for a in attacks]
    unguarded = []
    if args.unguarded:
        unguard()
        unguarded = [(a, run_attack(a, cfg)) for a in attacks if a in VALUE_ATTACKS]
    report = dict(bench="swarm_attacks", config=dataclasses.asdict(cfg), cpus=os.cpu_count(),
                  clean=row(clean, clean), attacks={a: row(r, clean) for a, r in results},
                  unguarded={a: row(r, clean) for a, r in unguarded}, wall_s=round(time.monotonic() - t0, 1),
                  other_processes_cpus=others.read())
    print(json.dumps(report))
    print(f"\nclean swarm: eval loss {clean.loss:.4f} (chance 1.386), {min(clean.rounds)} rounds, "
          f"longest stall {clean.longest_stall_s:.1f} s; {cfg.steps} steps x {cfg.micro_batch} samples per peer, "
          f"{cfg.compression}\n")
    print(f"{'attack':<22}{'loss vs clean':>14}{'longest stall':>15}{'rounds':>8}{'finite':>8}{'named':>7}"
          f"{'wall s':>8}")
    for label, rows in (("", results), (" (unguarded)", unguarded)):
        for a, r in rows:
            named = "yes" if r.attacker and all(r.named().values()) else "NO"
            print(f"{a + label:<22}{r.loss / clean.loss:>14.3f}{r.longest_stall_s:>13.1f} s{min(r.rounds):>8}"
                  f"{'yes' if r.finite else 'NO':>8}{named:>7}{r.wall_s:>8.0f}")
    print(f"\nother processes kept {report['other_processes_cpus']:.2f} of {os.cpu_count()} CPUs busy on average; "
          f"{report['wall_s']:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
