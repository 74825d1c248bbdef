"""`modron-train download HUB_ID`: a hub model's safetensors weights, config, tokenizer, model card and
licence into Modron's models folder, one folder per commit; resumable, cancellable, checked.

huggingface_hub answers what the repository holds (`model_info` with file sizes and checksums); the
files themselves are fetched here with plain HTTP range requests, because huggingface_hub (2.x) writes
each download to a fresh temporary file and deletes it on failure, so an interrupted multi-GB download
would start again from zero. Here a file grows in `.partial/NAME.part` and a later run asks only for
the rest. The hub is a stranger: its numbers are bounded, its file names must be plain top-level
names (never a path), pickles and code are never fetched, and LFS files are checked against their
SHA-256 before they count as downloaded.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import DiskError, ModelError, UserError
from .model_files import PICKLED

REVISION = re.compile(r"^[\w.-][\w./-]{0,199}$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# A hub file name we write: one plain top-level name (no folder, no "..", no odd characters).
SAFE_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,199}$")
MAX_FILE_BYTES = 1 << 40          # 1 TiB: a larger size in the hub's answer is nonsense, not a model
MAX_SMALL_FILE_BYTES = 64 << 20   # configs, tokenizers, cards
MAX_SIBLINGS = 20_000
DISK_MARGIN = 256 << 20           # kept free after the download (the system needs some too)
CHUNK = 256 << 10
HTTP_TIMEOUT_S = 30
RETRIES = 4                        # attempts in a row without a byte of progress
EVENTS_PER_S = 4

# What a training run reads besides the weights: config, tokenizer, the card and licence (licence check).
SMALL_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "vocab.txt",
               "merges.txt", "chat_template.jinja", "chat_template.json", "README.md",
               "model.safetensors.index.json"}
LICENCE_PREFIXES = ("LICENSE", "LICENCE")


class Stopped(Exception):
    """The download was told to stop (the `stop` control, SIGTERM, Ctrl-C)."""


@dataclass
class RemoteFile:
    name: str
    size: int
    sha256: str | None   # LFS files: the content's digest, checked before the file counts


def models_dir() -> Path:
    from .paths import data_dir
    return data_dir() / "models"


def _endpoint() -> str:
    # Read at call time (huggingface_hub reads HF_ENDPOINT once, at import).
    from huggingface_hub import constants
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def check_repo_id(repo_id: str) -> str:
    from .catalog import is_hub_id
    repo_id = repo_id.strip()
    if not is_hub_id(repo_id):
        raise UserError(repo_id or "HUB_ID", "is not a hub model id; use the form org/name, e.g. "
                                             "HuggingFaceTB/SmolLM2-135M")
    return repo_id


def wanted(name: str) -> bool:
    """Whether a repository file is fetched: safetensors weights and the small files a run reads; never
    pickles, code, other frameworks' weights or anything in a subfolder."""
    if not SAFE_NAME.match(name) or name.endswith(".py"):
        return False
    if any(Path(name).match(p) for p in PICKLED):
        return False
    return name.endswith(".safetensors") or name in SMALL_FILES or name.startswith(LICENCE_PREFIXES)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _hub_error(repo_id: str, exc: Exception) -> UserError:
    """A library's exception from asking the hub, as one plain line."""
    from huggingface_hub import errors
    name = type(exc).__name__
    if isinstance(exc, errors.GatedRepoError):
        return ModelError(repo_id, "is gated on the Hugging Face hub: accept its terms on the model's page and "
                                   "log in (`hf auth login`), then download again")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return ModelError(repo_id, "no such model on the Hugging Face hub (or it is private)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return ModelError(repo_id, "has no such revision on the Hugging Face hub")
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return UserError(repo_id, "cannot be downloaded: offline mode is on (HF_HUB_OFFLINE)")
    if isinstance(exc, errors.HfHubHTTPError):
        return ModelError(repo_id, f"the Hugging Face hub refused: {_first_line(exc)}")
    if isinstance(exc, (OSError, urllib.error.URLError)) or "Connect" in name or "Timeout" in name \
            or "Network" in name or "Transport" in name or "Protocol" in name:
        return UserError(repo_id, f"cannot reach the Hugging Face hub at {_endpoint()} ({_first_line(exc)}); "
                                  "check the internet connection and try again")
    return ModelError(repo_id, f"the Hugging Face hub's answer could not be read ({_first_line(exc)})")


def remote_files(repo_id: str, revision: str | None = None) -> tuple[str, list[RemoteFile]]:
    """(commit, the files to fetch) of `repo_id` at `revision`, from the hub's file listing."""
    from huggingface_hub import HfApi
    try:
        info = HfApi(endpoint=_endpoint()).model_info(repo_id, revision=revision, files_metadata=True,
                                                      timeout=HTTP_TIMEOUT_S)
    except Exception as exc:   # network, HTTP and parse errors come in many types; all one line
        raise _hub_error(repo_id, exc) from None
    commit = getattr(info, "sha", None)
    if not isinstance(commit, str) or not COMMIT.match(commit):
        raise ModelError(repo_id, "the hub's answer names no valid commit")
    files: list[RemoteFile] = []
    for sibling in list(getattr(info, "siblings", None) or [])[:MAX_SIBLINGS]:
        name = getattr(sibling, "rfilename", None)
        if not isinstance(name, str) or not wanted(name):
            continue
        lfs = getattr(sibling, "lfs", None)
        size = getattr(lfs, "size", None) if lfs is not None else getattr(sibling, "size", None)
        limit = MAX_FILE_BYTES if name.endswith(".safetensors") else MAX_SMALL_FILE_BYTES
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= limit:
            raise ModelError(repo_id, f"the hub gives {name} a size that is not believable ({size!r})")
        digest = getattr(lfs, "sha256", None) if lfs is not None else None
        files.append(RemoteFile(name, size, digest if isinstance(digest, str) and SHA256.match(digest) else None))
    names = {f.name for f in files}
    if "config.json" not in names:
        raise ModelError(repo_id, "has no config.json; it is not a model Modron can train")
    if not any(n.endswith(".safetensors") for n in names):
        raise ModelError(repo_id, "has no safetensors weights (only pickled or other formats); Modron never "
                                  "loads pickled weights")
    return commit, sorted(files, key=lambda f: (f.name.endswith(".safetensors"), f.name))   # small ones first


def _have(folder: Path, f: RemoteFile) -> int:
    """Bytes of `f` already here: all of it when the finished file is in place, else the partial file's."""
    done = folder / f.name
    if done.is_file() and done.stat().st_size == f.size:
        return f.size
    part = folder / ".partial" / (f.name + ".part")
    return min(part.stat().st_size, f.size) if part.is_file() else 0


def free_bytes(folder: Path) -> int:
    """Free space where `folder` is (or would be created)."""
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_disk(repo_id: str, out: Path, folder: Path, remaining: int) -> None:
    free = free_bytes(folder)
    if remaining + DISK_MARGIN > free:
        from .preflight import format_bytes
        raise DiskError(repo_id, f"not enough free disk space in {out}: the download needs {format_bytes(remaining)} "
                                 f"more and {format_bytes(DISK_MARGIN)} should stay free, but only "
                                 f"{format_bytes(free)} is free; free some space or choose another folder (--out)")


class _Progress:
    """Bytes done, shared between the transfer thread and the thread that reports it."""

    def __init__(self, total: int, done: int):
        self.total, self.done, self.start_done = total, done, done
        self.file = ""
        self.window: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n

    def figures(self) -> tuple[int, float | None, float | None]:
        """(done, rate in bytes/s over the last few seconds, seconds left)."""
        now = time.monotonic()
        with self.lock:
            done = self.done
            self.window.append((now, done))
            while len(self.window) > 2 and now - self.window[0][0] > 5:
                self.window.popleft()
            t0, d0 = self.window[0]
        rate = (done - d0) / (now - t0) if now - t0 > 0.2 else None
        eta = (self.total - done) / rate if rate else None
        return done, rate, eta


def _request(url: str, headers: dict[str, str], offset: int) -> urllib.request.Request:
    req = urllib.request.Request(url)
    for key, value in headers.items():
        if key.lower() == "authorization":
            req.add_unredirected_header(key, value)   # the token goes to the hub, never to its CDN
        else:
            req.add_header(key, value)
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    return req


def _fetch(url: str, headers: dict[str, str], f: RemoteFile, folder: Path, progress: _Progress,
           cancel: threading.Event) -> None:
    """One file into folder/.partial/NAME.part (continuing what is there), checked, then moved in place."""
    part = folder / ".partial" / (f.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    failures = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have > f.size:   # not a prefix of this file (another version): start again
            progress.add(-have)
            part.unlink()
            have = 0
        if have == f.size:
            break
        got_any = False
        try:
            with urllib.request.urlopen(_request(url, headers, have), timeout=HTTP_TIMEOUT_S) as resp:
                if have and resp.status != 206:   # the server ignored the range: take the whole file again
                    progress.add(-have)
                    have = 0
                    mode = "wb"
                elif have and not str(resp.headers.get("Content-Range", "")).startswith(f"bytes {have}-"):
                    raise ModelError(f.name, "the server answered a different byte range than asked")
                else:
                    mode = "ab"
                with open(part, mode, buffering=0) as out:
                    while True:
                        if cancel.is_set():
                            raise Stopped
                        chunk = resp.read(min(CHUNK, f.size - have + 1))
                        if not chunk:
                            break
                        if have + len(chunk) > f.size:
                            raise ModelError(f.name, "the server sent more bytes than the hub said the file has")
                        out.write(chunk)
                        have += len(chunk)
                        progress.add(len(chunk))
                        got_any = True
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:   # our partial file is not a prefix the server knows
                progress.add(-have)
                part.unlink(missing_ok=True)
                continue
            if exc.code in (401, 403):
                raise ModelError(f.name, f"the hub refused the download (HTTP {exc.code}); the model may be gated: "
                                         "accept its terms on its page and log in (`hf auth login`)") from None
            raise ModelError(f.name, f"the hub answered HTTP {exc.code} ({exc.reason})") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:   # a dropped connection
            if isinstance(exc, OSError) and exc.errno is not None and user_disk_error(exc):
                raise
            reason = getattr(exc, "reason", exc)
            problem = _first_line(reason) if isinstance(reason, BaseException) else str(reason)
        else:
            if have == f.size:
                break
            problem = "the connection closed before the end of the file"
        # Continue from `have` after a pause; give up after RETRIES attempts in a row that brought nothing.
        failures = 0 if got_any else failures + 1
        if failures >= RETRIES:
            raise UserError(f.name, f"the download keeps failing ({problem}); check the internet connection "
                                    "and run the download again: it continues where it stopped")
        for _ in range(int(2 ** failures * 5)):   # 1, 2, 4 s, leaving at once on a stop
            if cancel.is_set():
                raise Stopped
            time.sleep(0.1)
    if f.sha256 is not None and _sha256(part, cancel) != f.sha256:
        progress.add(-f.size)
        part.unlink()
        raise ModelError(f.name, "the downloaded file does not match its checksum (it was damaged on the way); "
                                 "download again")
    os.replace(part, folder / f.name)


def user_disk_error(exc: OSError) -> bool:
    from .errors import user_error_from
    return user_error_from(exc) is not None


def _sha256(path: Path, cancel: threading.Event) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(4 << 20):
            if cancel.is_set():
                raise Stopped
            h.update(block)
    return h.hexdigest()


def download(repo_id: str, revision: str | None, out: Path, progress_cb: Callable[[_Progress], None],
             cancel: threading.Event) -> dict[str, Any]:
    """Fetch what is missing of `repo_id` into out/ORG--NAME/COMMIT12/; the answer names that folder."""
    repo_id = check_repo_id(repo_id)
    if revision is not None and (not REVISION.match(revision) or ".." in revision):
        raise UserError("--revision", f"{revision!r} is not a branch, tag or commit name")
    commit, files = remote_files(repo_id, revision)
    folder = out / repo_id.replace("/", "--") / commit[:12]
    have = {f.name: _have(folder, f) for f in files}
    total = sum(f.size for f in files)
    check_disk(repo_id, out, folder, total - sum(have.values()))
    folder.mkdir(parents=True, exist_ok=True)
    progress = _Progress(total, sum(have.values()))
    progress_cb(progress)
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers
    headers = build_hf_headers()
    for f in files:
        if have[f.name] == f.size and (folder / f.name).is_file():
            continue
        progress.file = f.name
        url = hf_hub_url(repo_id, f.name, revision=commit, endpoint=_endpoint())
        _fetch(url, headers, f, folder, progress, cancel)
    shutil.rmtree(folder / ".partial", ignore_errors=True)
    record = {"repo_id": repo_id, "revision": revision or "main", "commit": commit,
              "files": [f.name for f in files], "bytes": total}
    from .fsutil import atomic_write_text
    atomic_write_text(folder / ".modron-download.json", json.dumps(record, indent=2))
    return {"folder": str(folder), **record, "transferred": progress.done - progress.start_done}


# ---- the command -------------------------------------------------------------------------------
def cmd_download(args) -> int:
    from .controls import Controls, read_controls
    from .preflight import format_bytes, format_duration
    from .protocol import make_event
    from .textout import json_emitter

    out = Path(args.out).expanduser() if args.out else models_dir()
    cancel = threading.Event()
    state: dict[str, Any] = {}
    emit = json_emitter if args.json else None

    def work() -> None:
        try:
            state["answer"] = download(args.hub_id, args.revision, out,
                                       lambda p: state.__setitem__("progress", p), cancel)
        except BaseException as exc:   # handed to the main thread as it is
            state["error"] = exc

    def on_signal(signum, frame) -> None:
        cancel.set()

    if threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    else:
        old = {}
    controls = Controls()
    if args.json:   # the app's `stop` control (a reader that dies with the process)
        threading.Thread(target=read_controls, args=(sys.stdin, controls, json_emitter), daemon=True,
                         name="controls").start()
    thread = threading.Thread(target=work, name="download", daemon=True)
    thread.start()
    last = 0.0
    try:
        while thread.is_alive() and not cancel.is_set():
            thread.join(0.05)
            if controls.poll() == "stop":
                cancel.set()
            now = time.monotonic()
            p = state.get("progress")
            if p is not None and now - last >= 1 / EVENTS_PER_S and thread.is_alive():
                last = now
                done, rate, eta = p.figures()
                message = (f"{p.file or 'starting'}: {format_bytes(done)} of {format_bytes(p.total)}"
                           + (f" at {format_bytes(rate)}/s" if rate else "")
                           + (f", {format_duration(eta)} left" if eta is not None else ""))
                if emit:
                    emit(make_event("progress", task="download", done=done, total=p.total, unit="bytes",
                                    rate=rate, eta_s=eta, message=message, file=p.file))
                elif now - state.get("said", -10.0) >= 2:
                    state["said"] = now
                    sys.stderr.write(message + "\n")
        if cancel.is_set() and "answer" not in state and "error" not in state:
            # At once: the transfer thread may sit in a read; it dies with the process, and its
            # partial file (always a prefix of the file) is continued by the next run.
            p = state.get("progress")
            done = p.done if p is not None else 0
            message = (f"download of {args.hub_id} stopped at {format_bytes(done)}; download again to "
                       "continue where it stopped")
            if emit:
                emit(make_event("stopped", step=None, checkpoint=None, task="download", done=done,
                                total=p.total if p is not None else None, message=message))
                return 0
            sys.stderr.write(message + "\n")
            return 130
        thread.join()
        error = state.get("error")
        if error is not None:
            if isinstance(error, Stopped):
                return 0
            if emit:
                from .errors import user_error_from
                err = user_error_from(error)
                emit(make_event("failed", code=err.code if err else "internal",
                                message=str(err) if err else f"internal error: {type(error).__name__}: {error}",
                                step=None, task="download"))
            raise error
        answer = state["answer"]
        if emit:
            emit(make_event("progress", task="download", done=answer["bytes"], total=answer["bytes"],
                            unit="bytes", rate=None, eta_s=0, message="downloaded", file=""))
            emit(make_event("result", task="download", answer=answer))
        else:
            sys.stderr.write(f"downloaded {args.hub_id} ({format_bytes(answer['bytes'])}) into:\n")
            print(answer["folder"])
        return 0
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("download", help="download a hub model's safetensors weights, config and tokenizer "
                                        "(resumable; never pickles or code)")
    d.add_argument("hub_id", metavar="HUB_ID", help="e.g. HuggingFaceTB/SmolLM2-135M")
    d.add_argument("--revision", help="branch, tag or commit (default: main)")
    d.add_argument("--out", metavar="DIR", help="models folder (default: the models folder in Modron's data folder)")
    d.add_argument("--json", action="store_true", help="protocol events: progress, then result (or failed); "
                                                       "obeys `stop` on stdin")
    d.set_defaults(func=cmd_download)
