"""`modron`: the desktop app's entry point (tray, window, job queue)."""
from __future__ import annotations

import argparse
import hashlib
import os
import signal
import socket
import sqlite3
import sys
from pathlib import Path
from typing import Callable

NO_TRAY_TEXT = ("Your desktop has no system tray, so Modron lives in this window: closing it quits Modron "
                "(a running job saves a checkpoint first and continues at the next start). On GNOME, the "
                "\"AppIndicator and KStatusNotifierItem Support\" extension adds a tray.")
NO_TRAY_FLAG_TEXT = ("Started with --no-tray: closing this window quits Modron (a running job saves a checkpoint "
                     "first and continues at the next start).")

_home: Path | None = None   # the data folder this process started from, before the Settings choice


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modron", description="Modron: finetune language models on your own GPU.")
    p.add_argument("--demo", action="store_true", help="queue the demo job at start and show its Run view")
    p.add_argument("--data-dir", metavar="DIR", help="keep the queue, history, settings and runs in DIR")
    p.add_argument("--no-tray", action="store_true", help="no tray icon: closing the window quits")
    p.add_argument("--background", action="store_true",
                   help="start in the tray without opening the window (used when starting with the desktop)")
    p.add_argument("--quit-after-demo", action="store_true",
                   help="for scripts: run the demo (implies --demo), exit 0 when it finishes, 1 if it fails")
    p.add_argument("--self-test", action="store_true",
                   help="check the install without opening a window (app modules, a few engine steps); exit 0/1")
    return p


# --- data folder -------------------------------------------------------------------------------

def home_data_dir() -> Path:
    """The folder whose store keeps the data-folder choice: MODRON_DATA_DIR or the platform default."""
    if _home is not None:
        return _home
    from training_core.paths import data_dir
    return data_dir()


def apply_data_dir_choice() -> str | None:
    """Point MODRON_DATA_DIR at the folder chosen in Settings. Returns a warning line, or None."""
    global _home
    from app import settings
    from app.store import DB_NAME, Store, store_problem
    from training_core.paths import data_dir
    _home = data_dir()
    if store_problem(_home / DB_NAME):   # main() asks what to do about it; opening it here would hide it
        return None
    store = Store.open_default()
    try:
        chosen = settings.DATA_DIR_NEXT.get(store)
    finally:
        store.close()
    if not chosen or Path(chosen).resolve() == _home.resolve():
        return None
    try:
        Path(chosen).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return (f"The data folder chosen in Settings, {chosen}, is not available ({exc.strerror or exc}); "
                f"using {_home} this time.")
    os.environ["MODRON_DATA_DIR"] = str(chosen)   # also what the workers see
    return None


# --- a damaged store -----------------------------------------------------------------------------

def ask_to_replace_store(path: Path, problem: str, parent=None) -> bool:
    """The start-up question when the database is damaged or emptied: True to keep it aside and start
    a fresh one (with what can be read, and the runs found again on disk), False to quit."""
    from PySide6.QtWidgets import QMessageBox
    box = QMessageBox(parent)
    box.setObjectName("store_damaged")
    box.setIcon(QMessageBox.Icon.Warning)
    box.setWindowTitle("Modron: the database needs attention")
    box.setText(f"Modron's database {path} {problem}.")
    box.setInformativeText(
        "Modron can keep the damaged file aside (nothing is deleted), start a fresh database with everything "
        "it can still read from it, and find your runs again from their folders: they appear in History, "
        "and Retry continues one from its last checkpoint.\n\n"
        "Or quit now, and put back a backup of the file yourself.")
    fresh = box.addButton("Keep it aside and start fresh", QMessageBox.ButtonRole.AcceptRole)
    box.addButton("Quit", QMessageBox.ButtonRole.RejectRole)
    box.setDefaultButton(fresh)
    from PySide6.QtWidgets import QApplication
    app = QApplication.instance()
    quit_on_close = app.quitOnLastWindowClosed()
    app.setQuitOnLastWindowClosed(False)   # closing the question must not end the app before it starts
    try:
        box.exec()
    finally:
        app.setQuitOnLastWindowClosed(quit_on_close)
    return box.clickedButton() is fresh


def open_store(folder: Path):
    """The app's store in `folder`: (store, a note for the banner or None), or (None, None) when the
    store is damaged and the user chose to quit."""
    from app.store import DB_NAME, Store, recover_store, rediscover_runs, store_problem
    path = folder / DB_NAME
    problem = store_problem(path)
    if problem:
        if not ask_to_replace_store(path, problem):
            return None, None
        store, recovery = recover_store(path)
        return store, recovery.message()
    new = not path.exists()
    store = Store(path)
    found = rediscover_runs(store) if new else []
    note = (f"{len(found)} run(s) found in {store.runs_dir} were added to History." if found else None)
    return store, note


# --- one app per data folder --------------------------------------------------------------------

def _server_name(folder: Path) -> str:
    digest = hashlib.sha1(f"{folder.resolve()}|{os.getuid() if hasattr(os, 'getuid') else ''}".encode())
    return f"modron-{digest.hexdigest()[:16]}"


def _claim_instance(folder: Path):
    """A lock on the data folder. None when another Modron holds it (that one is asked to show itself):
    two apps on one queue would run two workers on one job."""
    from PySide6.QtCore import QLockFile
    from PySide6.QtNetwork import QLocalSocket
    lock = QLockFile(str(folder / "modron.lock"))
    lock.setStaleLockTime(0)   # stale only when its process is gone, however long the app has run
    if lock.tryLock(200):
        return lock
    sock = QLocalSocket()
    sock.connectToServer(_server_name(folder))
    if sock.waitForConnected(1000):
        sock.write(b"show\n")
        sock.waitForBytesWritten(1000)
        sock.disconnectFromServer()
    return None


def _listen_for_show(folder: Path, show: Callable[[], None]):
    from PySide6.QtNetwork import QLocalServer
    name = _server_name(folder)
    QLocalServer.removeServer(name)   # a socket file left by a crashed app
    server = QLocalServer()
    server.newConnection.connect(lambda: (server.nextPendingConnection(), show()))
    server.listen(name)
    return server


def _quit_on_signals(app) -> Callable[[], None]:
    # Qt's loop runs in C++, so Python signal handlers only run when Python code does: a socket the
    # signal writes to wakes a notifier, which runs a (Python) slot. SIGTERM/Ctrl+C quit cleanly.
    from PySide6.QtCore import QSocketNotifier
    rsock, wsock = socket.socketpair()
    rsock.setblocking(False)
    wsock.setblocking(False)
    try:
        old_fd = signal.set_wakeup_fd(wsock.fileno())
    except ValueError:   # not the main thread
        return lambda: None
    notifier = QSocketNotifier(rsock.fileno(), QSocketNotifier.Type.Read)
    notifier.activated.connect(lambda *_: rsock.recv(64))
    old = {sig: signal.signal(sig, lambda *_: app.quit()) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(old_fd)
        notifier.setEnabled(False)
        rsock.close()
        wsock.close()
    return restore


def read_sources_uncached() -> bool:
    """Stop PySide6 keeping the source of every module imported after it in memory.

    For each newly imported module, PySide6's `__feature__` support asks `inspect.getsource` whether
    the module mentions PySide6, and `linecache` keeps every file it read: ~180 k lines (~15 MB of
    Python strings, never returned to the system) once the charts have imported pyqtgraph. This
    does the same check reading the file itself. True when installed; False (nothing changed)
    where PySide6's internals differ."""
    feature = sys.modules.get("shibokensupport.feature")
    original = getattr(feature, "_mod_uses_pyside", None)
    if original is None or getattr(original, "_modron_uncached", False):
        return original is not None

    def mod_uses_pyside(module) -> bool:
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and path.endswith(".py"):
            try:
                with open(path, "rb") as f:
                    return b"PySide6" in f.read()
            except OSError:
                pass
        return original(module)   # no .py file: getsource fails without reading anything

    mod_uses_pyside._modron_uncached = True
    feature._mod_uses_pyside = mod_uses_pyside
    import linecache
    linecache.clearcache()   # what PySide6 read of the modules imported before it (~2 MB)
    return True


def watch_job(queue, store, job_id: int, on_end: Callable[[int], None]) -> None:
    """Call on_end(0) when the job finishes, on_end(1) when it fails or is cancelled."""
    def changed(jid: int) -> None:
        if jid != job_id:
            return
        job = store.get_job(jid)
        if job.state == "finished":
            on_end(0)
        elif job.state in ("failed", "cancelled"):
            if job.error:
                sys.stderr.write(f"modron: {job.name} failed: {job.error}\n")
            on_end(1)
    queue.job_changed.connect(changed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.self_test:   # before any Qt object exists: it must run without a display
        from app.self_test import main as self_test
        return self_test()
    if args.quit_after_demo:
        args.demo = True
    if args.data_dir:
        os.environ["MODRON_DATA_DIR"] = str(Path(args.data_dir).expanduser().resolve())

    from PySide6.QtWidgets import QApplication, QSystemTrayIcon
    read_sources_uncached()

    from training_core.errors import UserError
    app = QApplication.instance() or QApplication([sys.argv[0] if sys.argv else "modron"])
    app.setApplicationName("Modron")
    app.setDesktopFileName("modron")
    from app.icons import app_icon
    app.setWindowIcon(app_icon())

    try:
        warning = apply_data_dir_choice()
        from training_core.paths import data_dir
        folder = data_dir()
        lock = _claim_instance(folder)
        if lock is None:
            print(f"Modron is already running on {folder}; its window was brought up.")
            return 0
        from app.job_queue import JobQueue
        store, store_note = open_store(folder)
        if store is None:
            sys.stderr.write(f"modron: the database in {folder} is damaged; nothing was changed\n")
            lock.unlock()
            return 2
    except UserError as exc:
        sys.stderr.write(f"modron: {exc}\n")
        return 2
    except (OSError, sqlite3.Error) as exc:
        sys.stderr.write(f"modron: the data folder {os.environ.get('MODRON_DATA_DIR') or 'default'} "
                         f"cannot be used ({exc})\n")
        return 2

    from app.main_window import MainWindow
    from app.sysinfo import SysInfoPoller
    from app.tray import Tray

    from app.contribution import Contributor
    queue = JobQueue(store)
    queue.recover()
    contributor = Contributor(store, queue)   # before the event loop: its gate sees the queue's first start
    poller = SysInfoPoller()
    window = MainWindow(store, queue, poller=poller, contributor=contributor)
    has_tray = not args.no_tray and QSystemTrayIcon.isSystemTrayAvailable()
    app.setQuitOnLastWindowClosed(not has_tray)
    tray = None
    if has_tray:
        tray = Tray(store, queue, window)
        tray.attach_contributor(contributor)
        tray.show()
    banner = [] if has_tray else [NO_TRAY_FLAG_TEXT if args.no_tray else NO_TRAY_TEXT]
    if warning:
        banner.append(warning)
    if store_note:
        banner.append(store_note)
    window.show_banner("\n".join(banner))
    server = _listen_for_show(folder, tray.open_window if tray else lambda: (window.showNormal(),
                                                                           window.raise_(),
                                                                           window.activateWindow()))
    restore_signals = _quit_on_signals(app)

    first_run = not store.list_jobs()
    if args.demo or first_run or not has_tray or not args.background:
        window.show()
    if args.demo:
        job_id = window.start_demo()
        if args.quit_after_demo:
            watch_job(queue, store, job_id, app.exit)

    if os.environ.get("MODRON_REPORT_READY"):   # for bench/gui_footprint.py: the event loop is up
        from PySide6.QtCore import QTimer
        QTimer.singleShot(0, lambda: print(f"modron-ready tray={tray is not None}", flush=True))
    code = app.exec()
    # Quit: the running worker checkpoints and stops (a no-op when the tray's Quit already did it).
    contributor.shutdown()
    queue.shutdown()
    poller.shutdown()
    playground = window.views.built().get("playground")
    if playground is not None:
        playground.shutdown()   # a generation holds nothing worth saving: it ends now
    if tray is not None:
        tray.hide()
    server.close()
    store.close()
    lock.unlock()
    restore_signals()
    return code


if __name__ == "__main__":
    sys.exit(main())
