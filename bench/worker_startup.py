"""How long the training worker takes to start: spawn -> `started` event -> first `step` event.

Spawns `python -m training_core.cli run --spec JOB.json` as the app does (stdin/stdout pipes,
protocol lines on stdout) for scratch:tiny with the bytes tokenizer and with a tokenizer trained
at start-up, `--repeats` times each (interleaved), and sends `stop` once the first step event
arrives. Then the same with a spare worker (`run --spare`, app/spare_worker.py, started while the
user fills in New finetune): spawn -> `ready`, and the job handed -> first step. Every spawn gets fresh data and cache folders, so it pays for tokenizing the data, as a
first run on a new dataset does (`--cache warm` reuses a primed cache instead). Baselines, each in
a fresh interpreter: `python -c pass`, `import torch`, and `import training_core.engine`.

Prints one JSON line, then readable lines (medians, seconds).

    .venv/bin/python bench/worker_startup.py
    .venv/bin/python bench/worker_startup.py --repeats 5 --cache warm
    .venv/bin/python bench/worker_startup.py --repeats 5 --quiet-wait 30   # on a shared machine
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.engine_throughput import OtherCPU, wait_for_quiet  # noqa: E402
from training_core.config import JobSpec  # noqa: E402  (light: no torch)
from training_core.protocol import decode_event, encode, make_control  # noqa: E402

TOKENIZERS = ("bytes", "train")
EXIT_TIMEOUT_S = 120


def base_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(MODRON_DATA_DIR=str(home / "data"), MODRON_CACHE_DIR=str(home / "cache"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_HOME=str(home / "hf"))
    return env


def time_import(code: str, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
    return time.perf_counter() - t0


def spawn_once(spec: JobSpec, home: Path, spare: bool = False) -> dict[str, float]:
    """Seconds from Popen to each first-of-its-type event, until the first step; then stop the worker.
    `spare`: start `run --spare` instead, wait for its `ready` (seen["ready"], from Popen), then hand it the
    job; the other figures count from that moment (the app's "Add to queue" once the spare is ready)."""
    spec_path = home / "job-spec.json"
    spec.save(spec_path)
    cmd = [sys.executable, "-m", "training_core.cli", "run",
           *(["--spare"] if spare else ["--spec", str(spec_path)])]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=base_env(home), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8")
    lines: "queue.Queue[tuple[float, str | None]]" = queue.Queue()

    def pump() -> None:  # timestamp each line as it arrives
        for line in proc.stdout:
            lines.put((time.perf_counter(), line))
        lines.put((time.perf_counter(), None))
    threading.Thread(target=pump, daemon=True).start()
    err_lines: list[str] = []
    threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True).start()

    seen: dict[str, float] = {}
    try:
        if spare:
            t, line = lines.get(timeout=EXIT_TIMEOUT_S)
            if line is None or decode_event(line)["type"] != "ready":
                raise RuntimeError(f"the spare's first line was not `ready`: {line!r} {''.join(err_lines)[-2000:]}")
            seen["ready"] = t - t0
            t0 = time.perf_counter()
            proc.stdin.write(encode(make_control("job", spec=str(spec_path), resume=False)))
            proc.stdin.flush()
        while "step" not in seen:
            t, line = lines.get(timeout=EXIT_TIMEOUT_S)
            if line is None:
                raise RuntimeError(f"worker exited ({proc.wait()}) before its first step: {''.join(err_lines)[-2000:]}")
            ev = decode_event(line)
            if ev["type"] == "failed":
                raise RuntimeError(f"worker failed: {ev['message']}")
            seen.setdefault(ev["type"], t - t0)
        proc.stdin.write(encode(make_control("stop")))
        proc.stdin.flush()
        proc.wait(timeout=EXIT_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return seen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", nargs="+", default=[str(ROOT / "resources" / "demo" / "stories")],
                   help="dataset files/folders (default: the bundled demo stories)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", choices=["cold", "warm"], default="cold",
                   help="cold: fresh token cache per spawn; warm: one primed cache shared by all spawns")
    p.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                   help="before each timed spawn or import, wait up to S seconds for other processes to "
                        "leave the CPUs nearly idle (a shared machine; default: no wait)")
    args = p.parse_args(argv)

    tmp_ctx = tempfile.TemporaryDirectory(prefix="modron-bench-")
    tmp = Path(tmp_ctx.name)
    t_start = time.perf_counter()
    busy = {"cpu_s": 0.0, "wall_s": 0.0}   # other processes' CPU seconds over the timed parts (waits left out)

    def timed(fn, *a):
        probe, t0 = OtherCPU(), time.monotonic()
        out = fn(*a)
        dt = time.monotonic() - t0
        busy["cpu_s"] += probe.read() * dt
        busy["wall_s"] += dt
        return out

    def spec_for(tokenizer: str, out: Path) -> JobSpec:
        # Demo-like job; many steps so the run is mid-way when we stop it, as a real one would be.
        return JobSpec(model="scratch:tiny", data=args.data, out=str(out), steps=10_000,
                       batch_size=args.batch_size, seq_len=args.seq_len, tokenizer=tokenizer, device="cpu",
                       threads=args.threads, checkpoint_every=10**9, sample_prompts=[])

    def home_for(name: str) -> Path:
        return tmp / ("shared" if args.cache == "warm" else name)

    if args.cache == "warm":  # prime the token caches; not timed
        for tok in TOKENIZERS:
            spawn_once(spec_for(tok, tmp / f"prime-{tok}"), home_for("prime"))

    imports = {"python -c pass": "pass", "import torch": "import torch",
               "import training_core.engine": "import training_core.engine"}
    import_times: dict[str, list[float]] = {k: [] for k in imports}
    spawn_times: dict[str, list[dict[str, float]]] = {tok: [] for tok in TOKENIZERS}
    spare_times: dict[str, list[dict[str, float]]] = {tok: [] for tok in TOKENIZERS}
    for rep in range(args.repeats):
        for name, code in imports.items():
            wait_for_quiet(args.quiet_wait)
            import_times[name].append(timed(time_import, code, base_env(tmp / "imports")))
        for tok in (TOKENIZERS if rep % 2 == 0 else TOKENIZERS[::-1]):
            home = home_for(f"{tok}-{rep}")
            wait_for_quiet(args.quiet_wait)
            seen = timed(spawn_once, spec_for(tok, tmp / f"run-{tok}-{rep}"), home)   # a new run folder each time
            spawn_times[tok].append(seen)
            sys.stderr.write(f"  repeat {rep + 1}/{args.repeats} {tok:5s}: started {seen['started']:.2f} s, "
                             f"first step {seen['step']:.2f} s\n")
            wait_for_quiet(args.quiet_wait)
            seen = timed(spawn_once, spec_for(tok, tmp / f"spare-{tok}-{rep}"), home_for(f"spare-{tok}-{rep}"), True)
            spare_times[tok].append(seen)
            sys.stderr.write(f"  repeat {rep + 1}/{args.repeats} {tok:5s}, spare: ready {seen['ready']:.2f} s, "
                             f"then job -> first step {seen['step']:.2f} s\n")

    med = statistics.median
    result = {
        "bench": "worker_startup", "repeats": args.repeats, "cache": args.cache, "threads": args.threads,
        "data": args.data, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "import_s": {k: med(v) for k, v in import_times.items()},
        "spawn_to_started_s": {tok: med(s["started"] for s in v) for tok, v in spawn_times.items()},
        "spawn_to_first_step_s": {tok: med(s["step"] for s in v) for tok, v in spawn_times.items()},
        "spawn_to_preflight_s": {tok: med(s["preflight"] for s in v) for tok, v in spawn_times.items()},
        "spare_ready_s": {tok: med(s["ready"] for s in v) for tok, v in spare_times.items()},
        "spare_job_to_first_step_s": {tok: med(s["step"] for s in v) for tok, v in spare_times.items()},
        "runs": spawn_times,
        "spare_runs": spare_times,
        "quiet_wait_s": args.quiet_wait,
        "other_processes_cpus": round(busy["cpu_s"] / max(1e-9, busy["wall_s"]), 2),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(result))
    print(f"worker start-up, scratch:tiny, batch {args.batch_size} x {args.seq_len}, {args.threads} threads, "
          f"{args.cache} token cache, median of {args.repeats} (seconds)")
    for name, v in result["import_s"].items():
        print(f"  {name:28s} {v:6.2f}")
    for tok in TOKENIZERS:
        label = "bytes tokenizer" if tok == "bytes" else "trained tokenizer"
        print(f"  {label:18s} spawn -> started {result['spawn_to_started_s'][tok]:6.2f}   "
              f"spawn -> first step {result['spawn_to_first_step_s'][tok]:6.2f}")
    for tok in TOKENIZERS:
        label = "bytes tokenizer" if tok == "bytes" else "trained tokenizer"
        print(f"  {label:18s} spare: spawn -> ready {result['spare_ready_s'][tok]:6.2f}   "
              f"job handed -> first step {result['spare_job_to_first_step_s'][tok]:6.2f}")
    print(f"  other processes kept {result['other_processes_cpus']:.2f} of {os.cpu_count()} CPUs busy on average "
          "while it timed")
    tmp_ctx.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
