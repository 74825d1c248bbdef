"""Training throughput of the engine against a plain PyTorch loop and transformers.Trainer.

All three train the same from-scratch Llama preset (built by training_core.models.load_base,
so the same config and the same seeded initial weights) on the same packed blocks of a
generated text file (tokenized once into a shared cache), with the same batch size, sequence
length, fp32 on the CPU, thread count, AdamW (lr, betas, weight decay, fused as the engine
and Trainer's default use on the CPU), gradient clipping at 1.0 and number of steps. Each runs in this process, one
after another, in rotated order, `--repeats` times; the first `--warmup` steps of every run
are not timed. No eval, sample or checkpoint work falls inside a timed window.

Prints one JSON line, then readable lines. Targets: engine >= 0.97 x the plain loop and
>= 1.0 x Trainer (medians of tokens/s).

    .venv/bin/python bench/engine_throughput.py                    # mini, bytes tokenizer, ~2-3 min
    .venv/bin/python bench/engine_throughput.py --preset tiny --tokenizer train --repeats 5
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_VS_PLAIN = 0.97
TARGET_VS_TRAINER = 1.0
BETAS = (0.9, 0.95)          # what Engine.make_optimizer uses
MAX_GRAD_NORM = 1.0          # JobSpec's default, given to all three
BUSY_CPUS = 0.25             # other processes using more than this during a run make it noise


@dataclass
class Setup:
    args: argparse.Namespace
    tmp: Path
    data_file: Path
    tokenizer_choice: str    # "bytes" or a tokenizer folder: the engine loads exactly this one
    dataset: object          # PackedDataset the plain loop and Trainer draw blocks from
    vocab_size: int


@dataclass
class Measurement:
    tokens_per_s: float       # tokens in the timed window / its wall time
    step_times: list[float]   # seconds per step inside the window (see `measure`)
    final_loss: float
    threads: int
    other_cpus: float = 0.0   # CPUs other processes kept busy during this run


class OtherCPU:
    """How many CPUs other processes kept busy, on average, since this was made.

    This machine may be shared (other test runs, a browser): torch's CPU threads slow down a lot
    when a core is taken, so every report says how busy the rest of the machine was.
    """

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.monotonic(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float:
        c = psutil.cpu_times()
        return c.user + c.nice + c.system + getattr(c, "irq", 0) + getattr(c, "softirq", 0) + getattr(c, "steal", 0)

    @staticmethod
    def _own() -> float:  # this process and its finished (waited-for) children
        c = psutil.Process().cpu_times()
        return c.user + c.system + c.children_user + c.children_system

    def read(self) -> float:
        dt = max(1e-9, time.monotonic() - self.t0)
        return round(max(0.0, (self._busy() - self.busy0) - (self._own() - self.own0)) / dt, 2)


def wait_for_quiet(max_wait_s: float, threshold: float = 0.2, window_s: float = 2.0) -> None:
    """Wait (at most `max_wait_s`) until other processes use under `threshold` CPUs for `window_s`."""
    end = time.monotonic() + max_wait_s
    while time.monotonic() < end:
        probe = OtherCPU()
        time.sleep(window_s)
        if probe.read() < threshold:
            return


def measure(marks: dict[int, float], first: int, last: int, tokens_per_step: int, loss: float,
            threads: int) -> Measurement:
    """`marks`: step number -> time it ended. The window is (first, last].

    Also keeps each interval's time per step, repeated once per step it covers, so a median over
    them shrugs off bursts from other processes on a shared machine (the "robust" figures).
    """
    steps = sorted(s for s in marks if first <= s <= last)
    per_step = []
    for a, b in zip(steps, steps[1:]):
        per_step += [(marks[b] - marks[a]) / (b - a)] * (b - a)
    rate = (last - first) * tokens_per_step / (marks[last] - marks[first]) if last > first else float("nan")
    return Measurement(rate, per_step, loss, threads)


def write_text(path: Path, chars: int, seed: int = 0) -> None:
    """Prose-like text from a Zipf-weighted made-up vocabulary, in sentences and paragraphs."""
    rng = np.random.default_rng(seed)
    syl = ["ka", "lo", "mi", "ren", "tha", "es", "or", "un", "bri", "sto", "we", "ly", "an", "de"]
    words = sorted({"".join(rng.choice(syl, size=rng.integers(1, 4))) for _ in range(4000)})
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    parts, n = [], 0
    while n < chars:
        sentence = " ".join(words[i] for i in rng.choice(len(words), size=rng.integers(6, 18), p=p))
        piece = sentence.capitalize() + (".\n\n" if rng.random() < 0.15 else ". ")
        parts.append(piece)
        n += len(piece)
    path.write_text("".join(parts), encoding="utf-8")


def job_spec(setup: Setup, out: Path, compile: bool = False):
    from training_core.config import JobSpec
    a = setup.args
    return JobSpec(model=f"scratch:{a.preset}", data=[str(setup.data_file)], out=str(out), steps=a.steps, compile=compile,
                   batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, warmup_steps=a.warmup,
                   weight_decay=a.weight_decay, max_grad_norm=MAX_GRAD_NORM, precision="fp32", device="cpu",
                   threads=a.threads, tokenizer=setup.tokenizer_choice, seed=a.seed,
                   eval_fraction=0.0,             # no eval split: all three see the same train blocks
                   checkpoint_every=10**9,        # only the final checkpoint, after the timed window
                   sample_prompts=[], gradient_checkpointing=False)


def build_model(setup: Setup):
    """The engine's own model construction (load_base + the use_cache switch apply_method makes)."""
    import torch
    from training_core.models import load_base
    loaded = load_base(job_spec(setup, setup.tmp / "unused"), texts=None, dtype=torch.float32)
    model = loaded.model
    model.config.use_cache = False
    model.train()
    return model


def engine_schedule(warmup: int, total: int):
    """The engine's lr factor (linear warmup, cosine decay to 10 %), the same function it uses."""
    from training_core.strategy import warmup_cosine
    return warmup_cosine(warmup, total)


def batch_order(dataset, steps: int, batch_size: int) -> list[np.ndarray]:
    """The engine's data order (Engine.batch_indices): epoch permutations laid end to end."""
    need = steps * batch_size
    orders, epoch = [], 0
    while sum(len(o) for o in orders) < need:
        orders.append(dataset.epoch_order(epoch))
        epoch += 1
    flat = np.concatenate(orders)[:need]
    return [flat[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


# ---- the three contenders ----------------------------------------------------------------
def run_compiled(setup: Setup, rep: int) -> Measurement:
    """The engine with JobSpec.compile (its layers through torch.compile); the compile itself happens in
    the first step, before the timed window."""
    return run_engine(setup, rep, compile=True)


def run_engine(setup: Setup, rep: int, compile: bool = False) -> Measurement:
    """Engine.run(), timed between its own `step` events.

    Timing run() (rather than calling train_step() in a loop) charges the engine for everything
    its loop does per step: control polling, loss sync, the step event with its psutil call.
    Set-up happens before the first step event and the final checkpoint after the last one,
    so neither is inside the window [first step event at or after --warmup, step --steps].
    Step events come at most every 0.25 s, so the window may start a step or two later than
    --warmup; tokens are counted from the step numbers the events carry.
    """
    import torch
    from training_core.engine import Engine
    a = setup.args
    marks: dict[int, float] = {}
    seen: dict[str, dict] = {}

    def emit(ev: dict) -> None:
        if ev["type"] == "step":
            marks[ev["step"]] = time.perf_counter()
        elif ev["type"] in ("started", "warning"):
            seen.setdefault(ev["type"], ev)
    eng = Engine(job_spec(setup, setup.tmp / f"engine-run-{rep}", compile), emit)
    result = eng.run()
    shutil.rmtree(eng.run_dir, ignore_errors=True)   # its final checkpoint: not needed, and big
    started = seen["started"]
    assert started["device"] == "cpu" and started["precision"] == "fp32", started
    assert not started["gradient_checkpointing"], "the baselines do not checkpoint activations"
    assert eng.compiled == compile, f"asked compile={compile}, warnings: {seen.get('warning')}"
    first = min(s for s in marks if s >= a.warmup)
    if first == a.steps and rep >= 0:
        raise SystemExit("the engine's step events (at most 4 a second) left no timed window; raise --steps")
    return measure(marks, first, a.steps, a.batch_size * a.seq_len, float(result.final_loss),
                   torch.get_num_threads())


def run_plain(setup: Setup, rep: int) -> Measurement:
    """The loop anyone would write: forward, backward, clip, step, schedule, zero_grad."""
    import torch
    a = setup.args
    torch.set_num_threads(a.threads)
    model = build_model(setup)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=BETAS, weight_decay=a.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, engine_schedule(a.warmup, a.steps))
    from training_core.data.packed import has_documents, packed_inputs
    # Batches gathered up front: the baseline pays nothing for data. They get the engine's position ids
    # (restarting at each document; none where no document starts inside a block, as on this one-document
    # text file), so the losses still agree.
    batches = []
    for idx in batch_order(setup.dataset, a.steps, a.batch_size):
        positions = setup.dataset.train_positions(idx)
        batches.append(packed_inputs(torch.from_numpy(setup.dataset.train_batch(idx)),
                                     torch.from_numpy(positions) if has_documents(positions) else None))
    marks: dict[int, float] = {}
    loss = None
    for step, inputs in enumerate(batches, start=1):
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        marks[step] = time.perf_counter()
    return measure(marks, a.warmup, a.steps, a.batch_size * a.seq_len, float(loss.item()), torch.get_num_threads())


def run_trainer(setup: Setup, rep: int) -> Measurement:
    import torch
    from transformers import PrinterCallback, Trainer
    a = setup.args
    torch.set_num_threads(a.threads)
    model = build_model(setup)
    ds = setup.dataset

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return ds.num_train

        def __getitem__(self, i):
            ids = torch.from_numpy(ds.train_block(i))
            return {"input_ids": ids, "labels": ids}

    marks, info, callback = step_marks()
    # optim: default adamw_torch_fused, Trainer's own default and what the engine runs
    targs = trainer_args(setup, rep, a.trainer_optim)
    trainer = Trainer(model=model, args=targs, train_dataset=Blocks(), callbacks=[callback])
    trainer.remove_callback(PrinterCallback)   # it prints the end-of-run metrics to stdout
    out = trainer.train()
    return measure(marks, a.warmup, a.steps, a.batch_size * a.seq_len, float(out.training_loss), info["threads"])


CONTENDERS = {"engine": run_engine, "plain": run_plain, "trainer": run_trainer, "compiled": run_compiled}
DEFAULT_CONTENDERS = ["engine", "plain", "trainer"]   # `compiled` on request: its compile takes a minute


# ---- main ---------------------------------------------------------------------------------
def prepare(args: argparse.Namespace, tmp: Path) -> Setup:
    from training_core.data import build_dataset
    from training_core.models import PRESETS, bytes_tokenizer, train_tokenizer
    data_file = tmp / "text.txt"
    write_text(data_file, args.chars, seed=args.seed)
    if args.tokenizer == "bytes":
        tokenizer, choice = bytes_tokenizer(), "bytes"
    else:  # trained once here and saved, so the engine loads this very tokenizer from its folder
        tokenizer = train_tokenizer([data_file.read_text(encoding="utf-8")], PRESETS[args.preset].vocab_size)
        folder = tmp / "tokenizer"
        tokenizer.save_pretrained(str(folder))
        choice = str(folder)
    dataset = build_dataset([data_file], tokenizer, args.seq_len, eval_fraction=0.0, seed=args.seed)
    need = args.steps * args.batch_size
    if dataset.num_train < need:
        sys.stderr.write(f"note: {dataset.num_train} blocks for {need} sequences; the data repeats\n")
    return Setup(args, tmp, data_file, choice, dataset, len(tokenizer))


# ---- what this bench and bench/packing_throughput.py share ----------------------------------
def step_marks():
    """(marks, info, callback): a Trainer callback that notes when each step ended (marks: step -> time)
    and torch's thread count (info["threads"])."""
    import torch
    from transformers import TrainerCallback
    marks: dict[int, float] = {}
    info: dict = {}

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks[state.global_step] = time.perf_counter()
            info["threads"] = torch.get_num_threads()
    return marks, info, Marks()


def trainer_args(setup, rep: int, optim: str, **extra):
    """Trainer's arguments matching the engine's run: same optimizer settings, schedule, steps and seed,
    on the CPU, with no logging, eval or saving inside the run."""
    from transformers import TrainingArguments
    a = setup.args
    return TrainingArguments(
        output_dir=str(setup.tmp / f"trainer-{rep}"), per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=1, max_steps=a.steps, learning_rate=a.lr, weight_decay=a.weight_decay,
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], max_grad_norm=MAX_GRAD_NORM, optim=optim,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=a.warmup,
        logging_strategy="no", logging_steps=10**9, save_strategy="no", eval_strategy="no", report_to=[],
        use_cpu=True, dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=True, seed=a.seed,
        **extra)


def add_run_args(p: argparse.ArgumentParser, steps: int, warmup: int, repeats: int) -> None:
    """The options of a timed run: steps, warm-up, repeats, threads, optimizer, seed, quiet wait."""
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=warmup,
                   help="untimed steps at the start of each run (also lr warmup)")
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                   help="before each run, wait up to this long for other processes to go quiet")


def bench_folder() -> tempfile.TemporaryDirectory:
    """A throwaway folder for data, caches and runs; never a model hub."""
    tmp_ctx = tempfile.TemporaryDirectory(prefix="modron-bench-")
    tmp = Path(tmp_ctx.name)
    os.environ.update(MODRON_DATA_DIR=str(tmp / "data"), MODRON_CACHE_DIR=str(tmp / "cache"),
                      HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp / "hf"),
                      TRANSFORMERS_VERBOSITY="error")
    return tmp_ctx


def run_rounds(contenders: dict, names: list[str], setup, short, args, unit: str = "tok/s") -> dict[str, list]:
    """One short untimed round (`short`: the setup with fewer steps) so that lazy imports, allocator growth
    and the like do not land on whichever contender runs first; then `args.repeats` rounds in rotated
    order, each run noting how busy other processes kept the CPUs."""
    for name in names:
        contenders[name](short, -1)
    results: dict[str, list[Measurement]] = {name: [] for name in names}
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]   # rotate: no one always goes first
        for name in order:
            if args.quiet_wait:
                wait_for_quiet(args.quiet_wait, threshold=BUSY_CPUS / 2)
            during = OtherCPU()
            m = contenders[name](setup, rep)
            m.other_cpus = during.read()
            results[name].append(m)
            sys.stderr.write(f"  repeat {rep + 1}/{args.repeats} {name:8s} {m.tokens_per_s:9,.0f} {unit} "
                             f"(loss {m.final_loss:.4f}, {m.threads} threads, other processes "
                             f"{m.other_cpus:.2f} CPUs)\n")
    return results


def medians(results: dict[str, list], tokens_per_step: float) -> tuple[dict, dict, dict]:
    """(runs used, median tokens/s, robust tokens/s from the median time per step). Runs during which
    other processes kept a good part of a CPU busy are left out of the medians (unless that leaves
    none): they measure the other processes, not ours."""
    used = {n: [m for m in ms if m.other_cpus <= BUSY_CPUS] or ms for n, ms in results.items()}
    med = {n: statistics.median(m.tokens_per_s for m in ms) for n, ms in used.items()}
    robust = {n: tokens_per_step / statistics.median(t for m in ms for t in m.step_times) for n, ms in used.items()}
    return used, med, robust


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mini", help="scratch preset: tiny, mini, small ...")
    p.add_argument("--tokenizer", default="bytes", choices=["bytes", "train"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    add_run_args(p, steps=20, warmup=5, repeats=5)
    p.add_argument("--chars", type=int, default=400_000, help="size of the generated text file")
    p.add_argument("--trainer-optim", default="adamw_torch_fused", choices=["adamw_torch", "adamw_torch_fused"],
                   help="Trainer's optimizer; adamw_torch_fused (its default) is what the engine runs")
    p.add_argument("--only", nargs="+", choices=list(CONTENDERS), default=DEFAULT_CONTENDERS,
                   help="which to run (default: engine plain trainer; `compiled`: the engine with JobSpec.compile)")
    args = p.parse_args(argv)
    if not 1 <= args.warmup < args.steps:
        p.error("--warmup must be at least 1 and below --steps")

    tmp_ctx = bench_folder()
    tmp = Path(tmp_ctx.name)
    import torch
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    others = OtherCPU()
    setup = prepare(args, tmp)

    names = list(args.only)
    short = dataclasses.replace(setup, args=argparse.Namespace(**{**vars(args), "steps": args.warmup + 2}))
    results = run_rounds(CONTENDERS, names, setup, short, args)
    used, med, robust = medians(results, args.batch_size * args.seq_len)
    targets = {"engine_vs_plain": TARGET_VS_PLAIN, "engine_vs_trainer": TARGET_VS_TRAINER}
    ratios, robust_ratios = {}, {}
    for key, mine, other in (("engine_vs_plain", "engine", "plain"), ("engine_vs_trainer", "engine", "trainer"),
                             ("compiled_vs_engine", "compiled", "engine")):
        if mine in med and other in med:
            ratios[key] = med[mine] / med[other]
            robust_ratios[key] = robust[mine] / robust[other]
    passed = {k: v >= targets[k] for k, v in ratios.items() if k in targets}
    other_cpus = others.read()
    report = {
        "bench": "engine_throughput", "preset": args.preset, "tokenizer": args.tokenizer,
        "vocab_size": setup.vocab_size, "train_blocks": setup.dataset.num_train,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
        "repeats": args.repeats, "threads": args.threads, "trainer_optim": args.trainer_optim,
        "torch": torch.__version__,
        "median_tokens_per_s": med, "ratios": ratios, "targets": targets, "passed": passed,
        "robust_tokens_per_s": robust, "robust_ratios": robust_ratios,
        "runs_tokens_per_s": {n: [round(m.tokens_per_s, 1) for m in ms] for n, ms in results.items()},
        # Engine and plain loop start from the same weights and see the same batches and lr schedule, so
        # their losses agree (the engine's is the mean since its previous step event: equal when every
        # step is slower than the 0.25 s event interval). Trainer's is its mean over all steps.
        "final_loss": {n: [round(m.final_loss, 4) for m in ms] for n, ms in results.items()},
        "other_processes_cpus": other_cpus,
        "runs_other_processes_cpus": {n: [m.other_cpus for m in ms] for n, ms in results.items()},
        "runs_left_out": {n: len(results[n]) - len(used[n]) for n in results},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(report))
    print(f"scratch:{args.preset}, {args.tokenizer} tokenizer (vocab {setup.vocab_size}), batch {args.batch_size} x "
          f"{args.seq_len} tokens, fp32 CPU, {args.threads} threads, steps {args.warmup + 1}..{args.steps} timed, "
          f"{args.repeats} repeats")
    print(f"  {'':8s} {'median tok/s':>13s} {'robust tok/s':>13s}   (robust: from the median time per step)")
    for n in med:
        print(f"  {n:8s} {med[n]:13,.0f} {robust[n]:13,.0f}")
    for k, v in ratios.items():
        print(f"  {k}: {v:.3f} (robust {robust_ratios[k]:.3f})" + (
            f", target >= {targets[k]:.2f}: {'PASS' if passed[k] else 'FAIL'}" if k in targets else ""))
    left_out = sum(report["runs_left_out"].values())
    print(f"  other processes kept {other_cpus:.2f} of {os.cpu_count()} CPUs busy on average"
          + (f"; {left_out} run(s) taken while they used over {BUSY_CPUS} CPUs left out of the medians"
             if left_out else "")
          + ("; the figures are noisy" if other_cpus > BUSY_CPUS else ""))
    tmp_ctx.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
