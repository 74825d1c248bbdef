"""Chart redraw time with 500 k points per series (a full day of step events is ~350 k).

Times one live update of the Run view's chart: append a point, push it to pyqtgraph, paint the
widget, against the same data in a plain pyqtgraph PlotWidget without downsampling or clipping,
in the same process. Each update moves the x range (the new step is past the end), so the axes
are laid out anew every time, as in a live run. Also checks that what the chart hands pyqtgraph
still ends at the newest point, and the memory the chart's buffers hold. Target: median <= 16 ms (one frame at 60 Hz).

    QT_QPA_PLATFORM=offscreen python bench/chart_redraw.py [--points 500000] [--repeats 40] [--quiet-wait 60]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyqtgraph as pg  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from bench.engine_throughput import OtherCPU, wait_for_quiet  # noqa: E402 (numpy and psutil only)


def loss_curve(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.arange(1, n + 1, dtype=np.float64)
    y = 2.0 + 6.0 / np.sqrt(x) + rng.normal(0, 0.05, n)
    return x, y


def time_redraws(widget, update, repeats: int, app) -> list[float]:
    out = []
    for i in range(repeats):
        t0 = time.perf_counter()
        update(i)
        widget.repaint()          # synchronous paint of the whole plot
        app.processEvents()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=500_000)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--quiet-wait", type=float, default=0.0,
                    help="first wait up to this many seconds for other processes to go quiet")
    args = ap.parse_args()
    if args.quiet_wait > 0:
        wait_for_quiet(args.quiet_wait)
    others = OtherCPU()
    app = QApplication.instance() or QApplication([])
    from app.charts import TimeSeriesChart

    n = args.points
    x, y = loss_curve(n, 0)
    ex, ey = x[::50], y[::50] + 0.3

    chart = TimeSeriesChart("loss", "loss")
    chart.resize(1000, 420)
    chart.show()
    chart.set_series("train", x, y)
    chart.set_series("eval", ex, ey)
    chart.redraw()
    app.processEvents()

    def update_chart(i: int) -> None:
        chart.append("train", n + i + 1, 2.0)
        chart.redraw()
    ours = time_redraws(chart, update_chart, args.repeats, app)
    shown_x, _ = chart.curves["train"].getData()
    newest_shown = bool(shown_x[-1] == n + args.repeats)
    buffers_mb = sum(b._data.nbytes for b in chart._buffers.values()) / 1e6
    others_ours = others.read()

    plain = pg.PlotWidget()
    plain.resize(1000, 420)
    plain.show()
    data = {"x": x.copy(), "y": y.copy()}
    curve = plain.plot(data["x"], data["y"])
    plain.plot(ex, ey)
    app.processEvents()

    def update_plain(i: int) -> None:
        data["x"] = np.append(data["x"], n + i + 1)
        data["y"] = np.append(data["y"], 2.0)
        curve.setData(data["x"], data["y"])
    base = time_redraws(plain, update_plain, max(5, args.repeats // 4), app)

    result = {"bench": "chart_redraw", "points_per_series": n, "median_ms": round(statistics.median(ours), 2),
              "p95_ms": round(sorted(ours)[int(0.95 * (len(ours) - 1))], 2),
              "plain_pyqtgraph_median_ms": round(statistics.median(base), 2),
              "speedup_vs_plain": round(statistics.median(base) / statistics.median(ours), 1),
              "points_handed_to_pyqtgraph": len(shown_x), "newest_point_shown": newest_shown,
              "chart_buffers_mb": round(buffers_mb, 1),
              "target_ms": 16, "meets_target": statistics.median(ours) <= 16,
              "other_processes_cpus": others_ours, "other_processes_cpus_whole_run": others.read()}
    print(json.dumps(result))
    print(f"chart redraw with {n:,} points/series: median {result['median_ms']} ms "
          f"(plain pyqtgraph {result['plain_pyqtgraph_median_ms']} ms, {result['speedup_vs_plain']}x); target <= 16 ms; "
          f"other processes kept {others_ours} CPUs busy")


if __name__ == "__main__":
    main()
