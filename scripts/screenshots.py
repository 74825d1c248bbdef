"""Screenshots of every view with a run in progress (run by scripts/screenshots.sh under Xvfb).

Builds the real app (store, queue, window, tray) on a throwaway data folder, queues the demo,
waits until its charts have points, then saves one PNG per view and one of the whole screen.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs" / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MODRON_DATA_DIR", tempfile.mkdtemp(prefix="modron-shots-"))
    from PySide6.QtWidgets import QApplication
    app = QApplication([sys.argv[0]])
    from app.contribution import Contributor
    from app.job_queue import JobQueue
    from app.main_window import MainWindow
    from app.store import Store
    from app.sysinfo import SysInfoPoller
    from app.tray import Tray
    from training_core.demo import demo_spec
    from training_core.swarm.manifest import bundled_path, load_manifest, make_invite

    store = Store.open_default()
    queue = JobQueue(store)
    poller = SysInfoPoller()
    contributor = Contributor(store, queue)
    window = MainWindow(store, queue, poller=poller, contributor=contributor)
    tray = Tray(store, queue, window)
    tray.attach_contributor(contributor)
    tray.show()
    window.show()
    spec = demo_spec().to_dict()
    spec.pop("out")
    spec["steps"] = 400                      # long enough to stay "in progress" while we take pictures
    job_id = queue.submit(spec, "Demo: tiny model on the bundled stories")
    second = dict(spec, steps=50)
    queue.submit(second, "Queued: another demo")
    # The demo swarm joined (an invite without peers: nothing is contacted); the local demo run
    # holds the GPU, so the Swarm view shows why contribution waits.
    window.show_view("swarm").join(make_invite(load_manifest(bundled_path("swarms/demo.toml"))))
    store.set_setting("contribute_while_idle", True)
    window.show_view("run")

    def pump(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            app.processEvents()
            time.sleep(0.02)

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        pump(0.5)
        evals = store.metrics(job_id)["eval_loss"]
        if len(evals) >= 3:
            break
    else:
        print("screenshots: the demo did not reach its third eval in time", file=sys.stderr)
    shots = []
    for name in ("dashboard", "new", "queue", "run", "history", "swarm", "contribution", "settings"):
        window.show_view(name)
        pump(2.5 if name == "dashboard" else 1.0)
        path = out / f"{name}.png"
        window.grab().save(str(path))
        shots.append(path)
    window.show_view("run")
    tray.menu.popup(window.geometry().topRight())
    pump(1.0)
    if os.environ.get("DISPLAY"):
        screen = out / "screen.png"
        subprocess.run(["import", "-window", "root", str(screen)], check=False)
        shots.append(screen)
    tray.menu.hide()
    contributor.shutdown()
    queue.shutdown()
    poller.shutdown()
    store.close()
    for p in shots:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
