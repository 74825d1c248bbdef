"""The tray app's footprint: cold start to tray, idle RSS and idle CPU with no job; with
`--running`, also its RSS while the window shows a running job.

Starts `python -m app.main --background` on a fresh data folder (with one finished job in it, so
it is not a first run and stays in the tray), waits for its ready mark, then samples RSS and CPU
over `--idle` seconds. Baseline in the same command: a bare `QApplication` + `QSystemTrayIcon`
process, to show what Qt itself costs. `--running` then starts `python -m app.main --demo` on the
same folder: the window opens on the Run view of the demo job while its worker (a separate
process, not counted) trains, and the app's RSS is sampled over `--running-s` seconds (peak
reported). Uses a real X server with a tray (Xvfb + trayer) when they are installed, else Qt's
offscreen platform (no tray: the window shows instead).
Targets (issue 15): start <= 1.5 s, idle RSS <= 120 MB, idle CPU <= 1 % of a core, RSS while
showing a running job <= 150 MB.

    python bench/gui_footprint.py [--idle 60] [--running] [--running-s 40]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.engine_throughput import OtherCPU  # noqa: E402 (numpy and psutil only)

ROOT = Path(__file__).resolve().parents[1]
BARE = ("import sys; from PySide6.QtWidgets import QApplication, QSystemTrayIcon; from PySide6.QtGui import QIcon;"
        "from PySide6.QtCore import QTimer; app=QApplication([]); t=QSystemTrayIcon(QIcon()); t.show();"
        "QTimer.singleShot(0, lambda: print('modron-ready', flush=True)); app.exec()")


def start_x() -> tuple[dict, list[subprocess.Popen]]:
    env = dict(os.environ)
    if not (shutil.which("Xvfb") and shutil.which("trayer")):
        env["QT_QPA_PLATFORM"] = "offscreen"
        return env, []
    display = ":96"
    xvfb = subprocess.Popen(["Xvfb", display, "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    env.update(DISPLAY=display, QT_QPA_PLATFORM="xcb")
    tray = subprocess.Popen(["trayer", "--edge", "top", "--align", "right"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return env, [tray, xvfb]


def measure(cmd: list[str], env: dict, idle: float, name: str = "idle") -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    start_s = time.perf_counter() - t0
    if "modron-ready" not in line:
        proc.kill()
        raise SystemExit(f"no ready mark from {cmd}: {line!r}")
    p = psutil.Process(proc.pid)
    time.sleep(2.0)                       # let start-up work settle before the idle window
    cpu0 = p.cpu_times()
    w0 = time.perf_counter()
    rss, workers = [], 0
    while time.perf_counter() - w0 < idle:
        rss.append(p.memory_info().rss)
        workers = max(workers, len(p.children()))
        time.sleep(1.0)
    cpu1 = p.cpu_times()
    wall = time.perf_counter() - w0
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    cpu = max(0.0, (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall)
    return {"start_s": round(start_s, 3), f"{name}_rss_mb": round(max(rss) / 1e6, 1),
            f"{name}_cpu_pct": round(100 * cpu, 2), "ready": line.strip(), "child_processes": workers}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--idle", type=float, default=60.0)
    ap.add_argument("--running", action="store_true", help="also measure the window showing the demo job running")
    ap.add_argument("--running-s", type=float, default=40.0)
    args = ap.parse_args()
    others = OtherCPU()
    env, helpers = start_x()
    try:
        data = Path(tempfile.mkdtemp(prefix="modron-bench-"))
        env.update(MODRON_DATA_DIR=str(data), MODRON_REPORT_READY="1")
        sys.path.insert(0, str(ROOT))
        os.environ["MODRON_DATA_DIR"] = str(data)
        from app.store import Store   # no Qt, no torch: a finished job so this is not a first run
        store = Store.open_default()
        job = store.add_job({"model": "scratch:tiny", "data": ["x"], "tokenizer": "bytes"}, "earlier run")
        store.update_job(job.id, state="finished")
        store.close()
        bare = measure([sys.executable, "-c", BARE], env, min(args.idle, 10))
        app = measure([sys.executable, "-m", "app.main", "--background"], env, args.idle)
        others_idle = others.read()   # before the demo's worker (the app's child, not waited for) adds its own
        running = (measure([sys.executable, "-m", "app.main", "--demo"], env, args.running_s, "running")
                   if args.running else None)
    finally:
        for h in helpers:
            h.terminate()
    meets = app["start_s"] <= 1.5 and app["idle_rss_mb"] <= 120 and app["idle_cpu_pct"] <= 1.0
    if running:
        meets = meets and running["running_rss_mb"] <= 150
    result = {"bench": "gui_footprint", "platform": env["QT_QPA_PLATFORM"], "app": app, "bare_qt_tray": bare,
              "running_job": running, "start_ratio_vs_bare_qt": round(app["start_s"] / bare["start_s"], 2),
              "targets": {"start_s": 1.5, "idle_rss_mb": 120, "idle_cpu_pct": 1.0, "running_rss_mb": 150},
              "meets_targets": meets, "other_processes_cpus": others_idle}
    print(json.dumps(result))
    print(f"start to tray {app['start_s']} s (bare Qt tray {bare['start_s']} s), idle RSS {app['idle_rss_mb']} MB, "
          f"idle CPU {app['idle_cpu_pct']} % of a core over {args.idle:.0f} s on {env['QT_QPA_PLATFORM']}")
    if running:
        print(f"showing the running demo job: peak RSS {running['running_rss_mb']} MB over {args.running_s:.0f} s "
              f"(worker {'running' if running['child_processes'] else 'NOT seen'})")
    print(f"other processes kept {result['other_processes_cpus']} CPUs busy")


if __name__ == "__main__":
    main()
