"""The real app on a real X server (Xvfb, with and without a system tray) and end to end.

CI installs xvfb and trayer (.ci/run); these tests need them.
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def xserver(tmp_path):
    assert shutil.which("Xvfb"), "Xvfb is needed (Debian package xvfb; .ci/run installs it)"
    display = f":{40 + os.getpid() % 50}"
    xvfb = subprocess.Popen(["Xvfb", display, "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = dict(os.environ, DISPLAY=display, QT_QPA_PLATFORM="xcb", MODRON_DATA_DIR=str(tmp_path / "data"),
               MODRON_REPORT_READY="1")
    for _ in range(50):
        if subprocess.run(["xdpyinfo"], env=env, capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    helpers = []
    yield env, helpers
    for p in helpers + [xvfb]:
        p.terminate()
        p.wait(timeout=10)


def start_app(env, *args):
    return subprocess.Popen([sys.executable, "-m", "app.main", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop_app(proc):
    proc.send_signal(signal.SIGTERM)      # like a session logout: quits cleanly
    assert proc.wait(timeout=60) == 0, proc.stderr.read()


def test_app_sits_in_a_real_system_tray(xserver):
    env, helpers = xserver
    assert shutil.which("trayer"), "trayer is needed (Debian package trayer)"
    helpers.append(subprocess.Popen(["trayer", "--edge", "top", "--align", "right"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)
    proc = start_app(env)
    assert proc.stdout.readline().strip() == "modron-ready tray=True"
    stop_app(proc)


def test_without_a_tray_the_window_opens_and_says_why(xserver):
    env, _ = xserver
    proc = start_app(env, "--background")
    assert proc.stdout.readline().strip() == "modron-ready tray=False"
    # The window is mapped on the X server with Modron's title.
    time.sleep(1.0)
    out = subprocess.run(["xwininfo", "-root", "-tree"], env=env, capture_output=True, text=True).stdout
    assert '"Modron"' in out
    stop_app(proc)


def test_new_user_runs_the_demo_from_modron_to_a_finished_finetune(tmp_path):
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", MODRON_DATA_DIR=str(tmp_path / "data"))
    proc = subprocess.run([sys.executable, "-m", "app.main", "--quit-after-demo"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sys.path.insert(0, str(ROOT))
    os.environ["MODRON_DATA_DIR"] = env["MODRON_DATA_DIR"]
    from app.store import Store
    store = Store.open_default()
    [job] = store.list_jobs()
    assert job.state == "finished"
    m = store.metrics(job.id)
    assert len(m["loss"]) > 5 and m["loss"][-1] < m["loss"][0]
    assert len(m["eval_loss"]) >= 2
    store.close()
