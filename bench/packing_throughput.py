"""Useful (non-pad) training tokens/s on variable-length chat data: the engine's packing vs Trainer's padding.

Both train the same from-scratch preset (load_base, same seed), same tokenizer, fp32 on the CPU, same
threads, AdamW (lr, betas 0.9/0.95, weight decay, fused or not as the engine's own optimizer is on the
CPU), gradient clipping at 1.0, warm-up plus cosine-to-10 % schedule, the same batch size in sequences,
on the same generated chat JSONL file (record lengths lognormal, clipped to --min-tokens..--max-tokens):

- **engine**: `Engine(spec, emit).run()` on the file (the chat records rendered by data/formats.py,
  eos after each, packed into `--seq-len` blocks with position ids restarting per record, so attention
  stays inside each conversation); every token of a block is a real token;
- **trainer**: `transformers.Trainer` on the same rendered records (the same text, eos appended, cut at
  --seq-len), batches padded to their longest record by `DataCollatorForLanguageModeling(mlm=False)`,
  group_by_length off: what Trainer users do with chat data of varied lengths. Useful tokens are the
  non-pad ones (the collator's attention mask), counted per batch in the order the steps consume them.

They run in this process, one after another, in rotated order, `--repeats` times; the first
`--warmup` steps of every run are not timed. Prints one JSON line, then readable lines.
Target: engine useful tokens/s >= 1.3 x Trainer's (medians).

    .venv/bin/python bench/packing_throughput.py                  # tiny, bytes tokenizer, ~3-5 min on 2 quiet cores
    .venv/bin/python bench/packing_throughput.py --preset mini --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_throughput as et   # noqa: E402  (also puts the repository root on sys.path)

TARGET = 1.3


def write_chat(path: Path, records: int, min_tokens: int, max_tokens: int, median: float, sigma: float,
               seed: int) -> list[int]:
    """Chat JSONL: a user turn and an assistant turn per record, total length lognormal in characters
    (= tokens with the bytes tokenizer), clipped to [min_tokens, max_tokens]. Returns the lengths drawn."""
    rng = np.random.default_rng(seed)
    syl = ["ka", "lo", "mi", "ren", "tha", "es", "or", "un", "bri", "sto", "we", "ly", "an", "de"]
    words = sorted({"".join(rng.choice(syl, size=rng.integers(1, 4))) for _ in range(3000)})
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()

    def text(n: int) -> str:
        out, size = [], 0
        while size < n:
            w = words[rng.choice(len(words), p=p)]
            out.append(w)
            size += len(w) + 1
        return " ".join(out)[:max(1, n)].strip() or "ka"

    lengths = np.clip(rng.lognormal(np.log(median), sigma, records), min_tokens, max_tokens).astype(int)
    overhead = len("### User:\n\n\n### Assistant:\n") + 1    # formats.py's rendering without a chat template, + eos
    with open(path, "w", encoding="utf-8") as fh:
        for n in lengths:
            body = max(4, int(n) - overhead)
            user = max(2, body // 4)
            fh.write(json.dumps({"messages": [{"role": "user", "content": text(user).capitalize() + "?"},
                                              {"role": "assistant", "content": text(body - user - 1)}]}) + "\n")
    return lengths.tolist()


def engine_fused_on_cpu() -> bool:
    """Whether the engine's own optimizer on the CPU is torch's fused AdamW (Trainer then gets the same)."""
    import types
    import torch
    from training_core.strategy import LocalStrategy
    fake = types.SimpleNamespace(device=torch.device("cpu"), spec=types.SimpleNamespace(weight_decay=0.0))
    return bool(LocalStrategy().make_optimizer(fake, [torch.nn.Parameter(torch.zeros(2))], 1e-3).defaults["fused"])


def measure_useful(marks: dict[int, float], first: int, last: int, tokens_by_step: dict[int, int], loss: float,
                   threads: int) -> et.Measurement:
    """Like engine_throughput.measure, with each step's own count of useful tokens."""
    tokens = sum(tokens_by_step[s] for s in range(first + 1, last + 1))
    rate = tokens / (marks[last] - marks[first])
    steps = sorted(s for s in marks if first <= s <= last)
    per_token = [(marks[b] - marks[a]) / sum(tokens_by_step[s] for s in range(a + 1, b + 1))
                 for a, b in zip(steps, steps[1:])]
    return et.Measurement(rate, per_token, loss, threads)


def run_engine(setup: et.Setup, rep: int) -> et.Measurement:
    m = et.run_engine(setup, rep)   # every token of a packed block is a real one
    per_step = setup.args.batch_size * setup.args.seq_len
    m.step_times = [t / per_step for t in m.step_times]   # seconds per token, as measure_useful keeps them
    return m


def run_trainer(setup: et.Setup, rep: int) -> et.Measurement:
    import torch
    from transformers import DataCollatorForLanguageModeling, PrinterCallback, Trainer
    a = setup.args
    torch.set_num_threads(a.threads)
    model = et.build_model(setup)
    tok = setup.trainer_tokenizer
    records = setup.records
    collator = DataCollatorForLanguageModeling(tokenizer=tok, mlm=False)
    useful: list[int] = []   # non-pad tokens of each batch, in the order the steps get them

    def collate(features):
        batch = collator(features)
        useful.append(int(batch["attention_mask"].sum()))
        return batch

    marks, info, callback = et.step_marks()
    targs = et.trainer_args(setup, rep, setup.trainer_optim,
                            train_sampling_strategy="random")   # the default; not grouped by length
    trainer = Trainer(model=model, args=targs, train_dataset=records, data_collator=collate, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)
    out = trainer.train()
    tokens_by_step = {s: useful[s - 1] for s in range(1, a.steps + 1)}
    return measure_useful(marks, a.warmup, a.steps, tokens_by_step, float(out.training_loss), info["threads"])


CONTENDERS = {"engine": run_engine, "trainer": run_trainer}


def prepare(args: argparse.Namespace, tmp: Path) -> et.Setup:
    from training_core.data import build_dataset
    from training_core.data.cache import make_encoder
    from training_core.data.formats import read_file
    from training_core.models import bytes_tokenizer
    if args.tokenizer != "bytes":
        raise SystemExit("only --tokenizer bytes here: record lengths are drawn in bytes")
    data_file = tmp / "chat.jsonl"
    lengths = write_chat(data_file, args.records, args.min_tokens, args.max_tokens, args.median_tokens,
                         args.sigma, args.seed)
    tokenizer = bytes_tokenizer()
    dataset = build_dataset([data_file], tokenizer, args.seq_len, eval_fraction=0.0, seed=args.seed)
    # Trainer's records: the very texts the engine's cache tokenized (formats.py's rendering), eos appended
    # as the cache does, cut at --seq-len as a Trainer user's max_length would.
    encode = make_encoder(tokenizer)
    texts = [t for t, _end in read_file(data_file, tokenizer)]
    records = [{"input_ids": (ids + [tokenizer.eos_token_id])[:args.seq_len]} for ids in encode(texts)]
    setup = et.Setup(args, tmp, data_file, "bytes", dataset, len(tokenizer))
    setup.trainer_tokenizer, setup.records, setup.lengths = tokenizer, records, lengths
    setup.trainer_optim = "adamw_torch_fused" if engine_fused_on_cpu() else "adamw_torch"
    return setup


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="scratch preset: tiny, mini, small ...")
    p.add_argument("--tokenizer", default="bytes", choices=["bytes"])
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (blocks or padded records)")
    p.add_argument("--seq-len", type=int, default=1024, help="block length; Trainer's records are cut here")
    p.add_argument("--records", type=int, default=3000)
    p.add_argument("--min-tokens", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=1000)
    p.add_argument("--median-tokens", type=float, default=150.0)
    p.add_argument("--sigma", type=float, default=0.9, help="lognormal sigma of the record lengths")
    et.add_run_args(p, steps=10, warmup=3, repeats=3)
    args = p.parse_args(argv)
    if not 1 <= args.warmup < args.steps:
        p.error("--warmup must be at least 1 and below --steps")

    tmp_ctx = et.bench_folder()
    tmp = Path(tmp_ctx.name)
    import torch
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    others = et.OtherCPU()
    setup = prepare(args, tmp)
    names = list(CONTENDERS)

    import dataclasses
    short = dataclasses.replace(setup, args=argparse.Namespace(**{**vars(args), "steps": args.warmup + 2}))
    for attr in ("trainer_tokenizer", "records", "lengths", "trainer_optim"):
        setattr(short, attr, getattr(setup, attr))
    results = et.run_rounds(CONTENDERS, names, setup, short, args, unit="useful tok/s")
    used, med, robust = et.medians(results, 1.0)   # step_times here: seconds per useful token
    ratio = med["engine"] / med["trainer"]
    robust_ratio = robust["engine"] / robust["trainer"]
    lengths = np.array(setup.lengths)
    kept = np.array([len(r["input_ids"]) for r in setup.records])
    other_cpus = others.read()
    report = {
        "bench": "packing_throughput", "preset": args.preset, "tokenizer": args.tokenizer,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
        "repeats": args.repeats, "threads": args.threads, "trainer_optim": setup.trainer_optim,
        "torch": torch.__version__,
        "records": args.records, "record_tokens": {"min": int(kept.min()), "median": float(np.median(kept)),
                                                  "mean": round(float(kept.mean()), 1), "max": int(kept.max())},
        "drawn_lengths": {"median": float(np.median(lengths)), "p90": float(np.percentile(lengths, 90))},
        "engine_blocks": setup.dataset.num_train,
        "median_useful_tokens_per_s": med, "ratio": ratio, "target": TARGET, "passed": ratio >= TARGET,
        "robust_useful_tokens_per_s": robust, "robust_ratio": robust_ratio,
        "runs_useful_tokens_per_s": {n: [round(m.tokens_per_s, 1) for m in ms] for n, ms in results.items()},
        "final_loss": {n: [round(m.final_loss, 4) for m in ms] for n, ms in results.items()},
        "other_processes_cpus": other_cpus,
        "runs_other_processes_cpus": {n: [m.other_cpus for m in ms] for n, ms in results.items()},
        "runs_left_out": {n: len(results[n]) - len(used[n]) for n in results},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(report))
    print(f"scratch:{args.preset}, bytes tokenizer, {args.records} chat records of {kept.min()}-{kept.max()} tokens "
          f"(median {np.median(kept):.0f}, mean {kept.mean():.0f}), batch {args.batch_size} sequences, "
          f"seq_len {args.seq_len}, fp32 CPU, {args.threads} threads, {setup.trainer_optim}, steps "
          f"{args.warmup + 1}..{args.steps} timed, {args.repeats} repeats")
    print(f"  {'':8s} {'median useful tok/s':>20s} {'robust':>10s}")
    for n in med:
        print(f"  {n:8s} {med[n]:20,.0f} {robust[n]:10,.0f}")
    print(f"  engine_vs_trainer (useful tokens/s): {ratio:.2f} (robust {robust_ratio:.2f}), target >= {TARGET}: "
          f"{'PASS' if ratio >= TARGET else 'FAIL'}")
    left_out = sum(report["runs_left_out"].values())
    print(f"  other processes kept {other_cpus:.2f} of {os.cpu_count()} CPUs busy on average"
          + (f"; {left_out} run(s) taken while they used over {et.BUSY_CPUS} CPUs left out of the medians"
             if left_out else "")
          + ("; the figures are noisy" if other_cpus > et.BUSY_CPUS else ""))
    tmp_ctx.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
