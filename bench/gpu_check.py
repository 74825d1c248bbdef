"""GPU check for a lent machine (one prepared script; prints one JSON line per result).

1. The `base` (~125 M) from-scratch preset in bf16 for a few hundred steps: tokens/s, MFU, peak VRAM.
2. A forced *real* CUDA OOM (a micro-batch far too big) that the engine recovers from by halving.

    PYTHONPATH=. python bench/gpu_check.py --steps 300
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training_core.config import JobSpec  # noqa: E402
from training_core.engine import Engine  # noqa: E402
from training_core.hardware import detect  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}   # dense tensor-core FLOP/s


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def big_corpus(folder: Path, mb: int) -> Path:
    """The demo stories repeated to `mb` MB, shuffled by paragraph, so the token cache has real work."""
    import random
    paras = []
    for f in sorted((ROOT / "resources" / "demo" / "stories").glob("*.txt")):
        paras += [p for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    rng = random.Random(0)
    out = folder / "corpus.txt"
    size = 0
    with open(out, "w", encoding="utf-8") as fh:
        while size < mb * 1_000_000:
            rng.shuffle(paras)
            chunk = "\n\n".join(paras) + "\n\n"
            fh.write(chunk)
            size += len(chunk)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--corpus-mb", type=int, default=20)
    ap.add_argument("--oom-batch", type=int, default=512)
    args = ap.parse_args()
    hw = detect()
    gpu = hw.best_gpu()
    print(json.dumps({"check": "hardware", "gpus": [g.name for g in hw.gpus], "driver": hw.driver_version,
                      "cuda": hw.cuda_driver_version, "torch": torch.__version__}), flush=True)
    tmp = Path(tempfile.mkdtemp())
    data = big_corpus(tmp, args.corpus_mb)

    events: list[dict] = []
    spec = JobSpec(model=f"scratch:{args.preset}", data=[str(data)], out=str(tmp / "base"), steps=args.steps,
                   batch_size=args.batch, seq_len=args.seq, lr=6e-4, tokenizer="train", checkpoint_every=10**6,
                   sample_max_tokens=20, precision="bf16")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    eng = Engine(spec, events.append)
    eng.run()
    wall = time.time() - t0
    steps = [e for e in events if e["type"] == "step"]
    started = next(e for e in events if e["type"] == "started")
    tail = [s["tokens_per_s"] for s in steps if s["step"] > args.steps // 5]
    tps = statistics.median(tail)
    cfg = eng.model.config
    n = started["params_total"]
    flops_per_token = 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * args.seq
    peak = peak_flops(gpu.name if gpu else "")
    print(json.dumps({
        "check": "base_bf16", "gpu": gpu.name if gpu else None, "params": n, "precision": started["precision"],
        "steps": args.steps, "batch": args.batch, "seq_len": args.seq, "tokens_per_s": round(tps),
        "mfu": round(flops_per_token * tps / peak, 4) if peak else None,
        "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
        "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"],
        "final_eval_loss": events[-1].get("final_eval_loss"), "wall_s": round(wall, 1),
        "preflight": next(e for e in events if e["type"] == "preflight")["memory"],
    }), flush=True)
    del eng
    if not cuda:
        return
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    # A real OOM: a micro-batch of 512 x 1024 tokens through the base model does not fit on any card.
    events = []
    spec = JobSpec(model=f"scratch:{args.preset}", data=[str(data)], out=str(tmp / "oom"), steps=3, batch_size=args.oom_batch,
                   seq_len=1024, tokenizer="train", checkpoint_every=10**6, sample_max_tokens=5,
                   precision="bf16", gradient_checkpointing=False)
    t0 = time.time()
    Engine(spec, events.append).run()
    rec = [e for e in events if e["type"] == "oom_recovered"]
    print(json.dumps({"check": "real_oom", "recoveries": [(e["old_micro_batch"], e["new_micro_batch"]) for e in rec],
                      "finished": events[-1]["type"] == "finished", "steps": events[-1].get("step"),
                      "wall_s": round(time.time() - t0, 1),
                      "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)}), flush=True)


if __name__ == "__main__":
    main()
