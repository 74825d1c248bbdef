"""What opening a long job's charts costs the app: Store.metrics() (Python lists) vs Store.metric_arrays().

Fills a throwaway store with `--rows` step rows (default: a day at the engine's 4 step events a second)
and, in a fresh interpreter per contender, times the load and reads the memory it adds (RSS kept after
the call) and the process's peak.

    .venv/bin/python bench/metrics_load.py                # ~30 s
    .venv/bin/python bench/metrics_load.py --rows 50000

Prints one JSON line, then readable lines.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import gc, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import numpy, psutil
from app.store import Store
store = Store(sys.argv[2])
gc.collect()
proc = psutil.Process()
rss0 = proc.memory_info().rss
t0 = time.perf_counter()
series = getattr(store, sys.argv[3])(1)
seconds = time.perf_counter() - t0
gc.collect()
print(json.dumps({"seconds": seconds, "kept_mb": (proc.memory_info().rss - rss0) / 2**20,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "points": len(series["step"])}))
"""


def fill(path: Path, rows: int) -> None:
    from app.store import Store
    store = Store(path)
    job = store.add_job({"model": "scratch:tiny"}, "long job")
    assert job.id == 1
    with store._lock:
        store._db.executemany(
            "INSERT INTO metrics (job_id, kind, step, time, elapsed_s, loss, eval_loss, perplexity, lr, "
            "tokens_per_s, vram_used, vram_reserved, ram_used, eta_s) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            ((job.id, "step", i, 1e9 + i / 4, i / 4, 2.0 + 1 / (i + 1), None, None, 3e-4, 5000.0 + i % 7,
              1.2e9, 2.4e9, 3.1e8, rows / 4 - i / 4) for i in range(rows)))
        store._db.commit()
    store.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4 * 86400)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="modron-metrics-") as tmp:
        db = Path(tmp) / "modron.db"
        fill(db, args.rows)
        results = {}
        for method in ("metrics", "metric_arrays"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(db), method], check=True,
                                 capture_output=True, text=True).stdout
            results[method] = json.loads(out.strip().splitlines()[-1])
    lists, arrays = results["metrics"], results["metric_arrays"]
    print(json.dumps({"bench": "metrics_load", "rows": args.rows, **results,
                      "kept_ratio": round(lists["kept_mb"] / max(arrays["kept_mb"], 1e-9), 2)}))
    for name, r in results.items():
        print(f"{name:<14} {r['points']} points: {r['seconds']:.2f} s, +{r['kept_mb']:.0f} MB kept, "
              f"peak {r['peak_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
