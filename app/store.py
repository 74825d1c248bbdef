"""The app's database: the job queue, run metrics, event logs and settings in one SQLite file.

WAL mode so a reader (a second Store, a bench script) never blocks the writer, and so a
SIGKILLed app loses nothing it had committed. No Qt here: one connection, guarded by a lock,
usable from any thread.

A damaged or emptied file is found at start (`store_problem`) and, when the user agrees,
replaced (`recover_store`): the file is kept aside, what can still be read is copied into a
fresh store, and runs whose folders are on disk are found again from their job.json and
checkpoints (`rediscover_runs`). A job's run folder is named after its id and never shared:
a folder left by an earlier store gets a new name instead.
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training_core.checkpoint_files import list_checkpoints

if TYPE_CHECKING:
    import numpy as np

JOB_STATES = ("queued", "running", "paused", "finished", "failed", "cancelled")
# Jobs that still belong in the queue (a failed one can be retried); the rest is history.
ACTIVE_STATES = ("queued", "running", "paused", "failed")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    position INTEGER NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    run_dir TEXT NOT NULL,
    summary TEXT NOT NULL DEFAULT '{}',
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS metrics (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,             -- 'step' or 'eval'
    step INTEGER NOT NULL,
    time REAL NOT NULL,
    elapsed_s REAL,
    loss REAL,
    eval_loss REAL,
    perplexity REAL,
    lr REAL,
    tokens_per_s REAL,
    vram_used INTEGER,
    vram_reserved INTEGER,
    ram_used INTEGER,
    eta_s REAL
);
CREATE INDEX IF NOT EXISTS metrics_job ON metrics(job_id, time);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    type TEXT NOT NULL,
    time REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, id);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Swarm contribution, per swarm run id: running totals (kept across worker restarts and crashes)
-- and the swarm's figures over time for its chart. Added tables only: older apps ignore them.
CREATE TABLE IF NOT EXISTS swarm_stats (
    run_id TEXT PRIMARY KEY,
    samples INTEGER NOT NULL DEFAULT 0,
    contributed_s REAL NOT NULL DEFAULT 0,
    bytes_up INTEGER NOT NULL DEFAULT 0,
    bytes_down INTEGER NOT NULL DEFAULT 0,
    last_status TEXT NOT NULL DEFAULT '{}',
    updated REAL
);
CREATE TABLE IF NOT EXISTS swarm_metrics (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    time REAL NOT NULL,
    epoch INTEGER,
    loss REAL,
    peers INTEGER,
    samples_per_s REAL
);
CREATE INDEX IF NOT EXISTS swarm_metrics_run ON swarm_metrics(run_id, time);
"""

STEP_COLUMNS = ("step", "time", "elapsed_s", "loss", "lr", "tokens_per_s", "vram_used", "vram_reserved",
                "ram_used", "eta_s")
EVAL_COLUMNS = ("step", "time", "elapsed_s", "eval_loss", "perplexity")


def eval_key(column: str) -> str:
    """The metrics() key of an eval-row column: eval_step, eval_time, eval_elapsed_s, eval_loss, eval_perplexity."""
    return column if column.startswith("eval_") else f"eval_{column}"


@dataclass
class Job:
    id: int
    name: str
    spec: dict
    state: str
    position: int
    created: float
    started: float | None
    finished: float | None
    error: str | None
    run_dir: str
    summary: dict = field(default_factory=dict)   # last known figures: step, total_steps, loss, eval_loss...
    attempts: int = 0                              # workers started for it so far (>0: the next one resumes)


_JOB_COLS = "id, name, spec, state, position, created, started, finished, error, run_dir, summary, attempts"


def _job(row: tuple) -> Job:
    return Job(id=row[0], name=row[1], spec=json.loads(row[2]), state=row[3], position=row[4], created=row[5],
               started=row[6], finished=row[7], error=row[8], run_dir=row[9], summary=json.loads(row[10] or "{}"),
               attempts=row[11])


def _num(value: Any) -> Any:
    # Protocol numbers may be null (non-finite); anything else non-numeric is not a metric.
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class Store:
    def __init__(self, path: Path | str | None = None):
        if path is None:
            from training_core.paths import data_dir
            path = data_dir() / "modron.sqlite3"
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: autocommit; multi-statement changes use explicit transactions.
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")   # WAL + NORMAL survives an app crash; fast commits
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                self._db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                from training_core.errors import UserError
                raise UserError(self.path, f"was written by a newer Modron (schema {row[0]}); update Modron to open it")

    @classmethod
    def open_default(cls) -> "Store":
        return cls(None)

    @property
    def runs_dir(self) -> Path:
        # Next to the database, so a data folder is self-contained (and moves as one).
        return self.path.parent / "runs"

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _q(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ---- jobs -----------------------------------------------------------------------------
    def add_job(self, spec: dict, name: str) -> Job:
        spec = dict(spec)
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                pos = self._db.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM jobs").fetchone()[0]
                cur = self._db.execute(
                    "INSERT INTO jobs (name, spec, state, position, created, run_dir) VALUES (?, ?, 'queued', ?, ?, '')",
                    (name, "{}", pos, now))
                job_id = cur.lastrowid
                spec.setdefault("job_id", uuid.uuid4().hex[:12])
                if not spec.get("out"):
                    out = self.runs_dir / f"job-{job_id:05d}"
                    if os.path.lexists(out):   # left by an earlier store (reset, damaged): never share it
                        out = self.runs_dir / f"job-{job_id:05d}-{spec['job_id']}"
                    spec["out"] = str(out)
                self._db.execute("UPDATE jobs SET spec = ?, run_dir = ? WHERE id = ?",
                                 (json.dumps(spec), str(spec["out"]), job_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.get_job(job_id)

    def get_job(self, job_id: int) -> Job:
        rows = self._q(f"SELECT {_JOB_COLS} FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise KeyError(f"no job {job_id}")
        return _job(rows[0])

    def list_jobs(self, states=None) -> list[Job]:
        if states:
            states = tuple(states)
            marks = ",".join("?" * len(states))
            rows = self._q(f"SELECT {_JOB_COLS} FROM jobs WHERE state IN ({marks}) ORDER BY position, id", states)
        else:
            rows = self._q(f"SELECT {_JOB_COLS} FROM jobs ORDER BY position, id")
        return [_job(r) for r in rows]

    def update_job(self, job_id: int, **fields) -> Job:
        allowed = {"name", "state", "started", "finished", "error", "summary", "attempts", "position", "spec"}
        unknown = set(fields) - allowed
        if unknown:
            raise TypeError(f"update_job: unknown field(s) {', '.join(sorted(unknown))}")
        if "state" in fields and fields["state"] not in JOB_STATES:
            raise ValueError(f"unknown job state {fields['state']!r}")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if "summary" in fields:   # merged, so partial updates from different events add up
                    row = self._db.execute("SELECT summary FROM jobs WHERE id = ?", (job_id,)).fetchone()
                    if row is None:
                        raise KeyError(f"no job {job_id}")
                    merged = json.loads(row[0] or "{}")
                    merged.update(fields["summary"] or {})
                    fields["summary"] = json.dumps(merged)
                if "spec" in fields:
                    fields["spec"] = json.dumps(fields["spec"])
                if fields:
                    sets = ", ".join(f"{k} = ?" for k in fields)
                    cur = self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job_id))
                    if cur.rowcount == 0:
                        raise KeyError(f"no job {job_id}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.get_job(job_id)

    def move_job(self, job_id: int, index: int) -> None:
        """Put a job at `index` among the queue's jobs (ACTIVE_STATES); history keeps its places."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                marks = ",".join("?" * len(ACTIVE_STATES))
                rows = self._db.execute(f"SELECT id, position FROM jobs WHERE state IN ({marks}) "
                                        "ORDER BY position, id", ACTIVE_STATES).fetchall()
                ids = [r[0] for r in rows]
                if job_id not in ids:
                    raise KeyError(f"job {job_id} is not in the queue")
                # Reuse the same set of positions, so the jobs around them in history do not move.
                slots = sorted(r[1] for r in rows)
                if len(set(slots)) != len(slots):       # duplicates (old data): spread them out
                    slots = list(range(slots[0], slots[0] + len(slots)))
                ids.remove(job_id)
                ids.insert(max(0, min(index, len(ids))), job_id)
                for pos, jid in zip(slots, ids):
                    self._db.execute("UPDATE jobs SET position = ? WHERE id = ?", (pos, jid))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def move_job_to_end(self, job_id: int) -> None:
        """After every job, history included (used when a job is queued again)."""
        with self._lock:
            self._db.execute("UPDATE jobs SET position = (SELECT COALESCE(MAX(position), -1) + 1 FROM jobs) "
                             "WHERE id = ?", (job_id,))

    def next_queued(self) -> Job | None:
        rows = self._q(f"SELECT {_JOB_COLS} FROM jobs WHERE state = 'queued' ORDER BY position, id LIMIT 1")
        return _job(rows[0]) if rows else None

    def delete_job(self, job_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    # ---- metrics --------------------------------------------------------------------------
    def add_metric(self, job_id: int, event: dict) -> None:
        kind = event.get("type", "step")
        if kind not in ("step", "eval"):
            raise ValueError(f"add_metric takes step or eval events, not {kind!r}")
        t = _num(event.get("time")) or time.time()
        with self._lock:
            elapsed = _num(event.get("elapsed_s"))
            if elapsed is None and kind == "eval":
                # Eval events carry no clock of their own; place them on the run's training clock
                # from the nearest step row so the time-axis chart can show them.
                row = self._db.execute("SELECT elapsed_s, time FROM metrics WHERE job_id = ? AND kind = 'step' "
                                       "AND step <= ? ORDER BY step DESC, id DESC LIMIT 1",
                                       (job_id, event.get("step", 0))).fetchone()
                if row and row[0] is not None:
                    elapsed = row[0]
            self._db.execute(
                "INSERT INTO metrics (job_id, kind, step, time, elapsed_s, loss, eval_loss, perplexity, lr, "
                "tokens_per_s, vram_used, vram_reserved, ram_used, eta_s) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (job_id, kind, int(event.get("step") or 0), t, elapsed, _num(event.get("loss")),
                 _num(event.get("eval_loss")), _num(event.get("perplexity")), _num(event.get("lr")),
                 _num(event.get("tokens_per_s")), _num(event.get("vram_used")), _num(event.get("vram_reserved")),
                 _num(event.get("ram_used")), _num(event.get("eta_s"))))

    def truncate_metrics(self, job_id: int, after_step: int | None) -> int:
        """Drop metric rows past `after_step` (all rows when None): a resumed run redoes those steps,
        so the chart keeps only the history that led to the checkpoint. Returns rows removed."""
        with self._lock:
            if after_step is None:
                cur = self._db.execute("DELETE FROM metrics WHERE job_id = ?", (job_id,))
            else:
                cur = self._db.execute("DELETE FROM metrics WHERE job_id = ? AND step > ?", (job_id, after_step))
            return cur.rowcount

    def metrics(self, job_id: int) -> dict[str, list]:
        """Step series under their column names, eval series under eval_* names (see eval_key)."""
        out: dict[str, list] = {c: [] for c in STEP_COLUMNS}
        out.update({eval_key(c): [] for c in EVAL_COLUMNS})
        rows = self._q("SELECT kind, step, time, elapsed_s, loss, lr, tokens_per_s, vram_used, vram_reserved, "
                       "ram_used, eta_s, eval_loss, perplexity FROM metrics WHERE job_id = ? ORDER BY time, id",
                       (job_id,))
        for r in rows:
            if r[0] == "step":
                for col, val in zip(STEP_COLUMNS, r[1:11]):
                    out[col].append(val)
            else:
                for col, val in zip(EVAL_COLUMNS, (r[1], r[2], r[3], r[11], r[12])):
                    out[eval_key(col)].append(val)
        return out

    def metric_arrays(self, job_id: int) -> dict[str, np.ndarray]:
        """metrics() as float64 arrays (NaN where a value is missing), what the charts load. Filled a
        chunk of rows at a time: a day-long job has ~350 k step rows, which as Python lists cost the
        app ~200 MB and 1.5 s (bench/gui_footprint.py); as arrays, 28 MB and a fraction of that."""
        import numpy as np   # here: the tray alone never needs it
        out: dict[str, np.ndarray] = {}
        for kind, columns, names in (("step", STEP_COLUMNS, STEP_COLUMNS),
                                     ("eval", EVAL_COLUMNS, tuple(eval_key(c) for c in EVAL_COLUMNS))):
            # 9e999 is SQLite's +inf: a NULL becomes a float the array takes, then NaN below.
            select = ", ".join(f"COALESCE({c}, 9e999)" for c in columns)
            with self._lock:
                n = self._db.execute("SELECT COUNT(*) FROM metrics WHERE job_id = ? AND kind = ?",
                                     (job_id, kind)).fetchone()[0]
                table = np.empty((n, len(columns)), dtype=np.float64, order="F")   # columns contiguous
                cur = self._db.execute(f"SELECT {select} FROM metrics WHERE job_id = ? AND kind = ? "
                                       "ORDER BY time, id", (job_id, kind))
                filled = 0
                while filled < n and (rows := cur.fetchmany(8192)):
                    rows = rows[:n - filled]    # rows added since the count wait for the next load
                    table[filled:filled + len(rows)] = rows
                    filled += len(rows)
                cur.close()
            table = table[:filled]
            table[~np.isfinite(table)] = np.nan
            out.update({name: table[:, i] for i, name in enumerate(names)})
        return out

    def metric_count(self, job_id: int) -> int:
        return self._q("SELECT COUNT(*) FROM metrics WHERE job_id = ?", (job_id,))[0][0]

    # ---- events ---------------------------------------------------------------------------
    def add_event(self, job_id: int, event: dict) -> None:
        with self._lock:
            self._db.execute("INSERT INTO events (job_id, type, time, data) VALUES (?, ?, ?, ?)",
                             (job_id, str(event.get("type", "")), _num(event.get("time")) or time.time(),
                              json.dumps(event, ensure_ascii=False)))

    def events(self, job_id: int, types: set[str] | None = None) -> list[dict]:
        if types:
            types = tuple(types)
            marks = ",".join("?" * len(types))
            rows = self._q(f"SELECT data FROM events WHERE job_id = ? AND type IN ({marks}) ORDER BY id",
                           (job_id, *types))
        else:
            rows = self._q("SELECT data FROM events WHERE job_id = ? ORDER BY id", (job_id,))
        return [json.loads(r[0]) for r in rows]

    # ---- settings -------------------------------------------------------------------------
    def get_setting(self, key: str, default=None):
        rows = self._q("SELECT value FROM settings WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def set_setting(self, key: str, value) -> None:
        with self._lock:
            self._db.execute("INSERT INTO settings (key, value) VALUES (?, ?) "
                             "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, json.dumps(value)))

    # ---- swarm contribution ---------------------------------------------------------------
    SWARM_TOTALS = ("samples", "contributed_s", "bytes_up", "bytes_down")

    def swarm_stats(self, run_id: str) -> dict:
        """Totals for one swarm run: samples, contributed_s, bytes_up, bytes_down, last_status, updated."""
        rows = self._q("SELECT samples, contributed_s, bytes_up, bytes_down, last_status, updated "
                       "FROM swarm_stats WHERE run_id = ?", (run_id,))
        if not rows:
            return {"samples": 0, "contributed_s": 0.0, "bytes_up": 0, "bytes_down": 0, "last_status": {},
                    "updated": None}
        r = rows[0]
        return {"samples": r[0], "contributed_s": r[1], "bytes_up": r[2], "bytes_down": r[3],
                "last_status": json.loads(r[4] or "{}"), "updated": r[5]}

    def set_swarm_stats(self, run_id: str, **fields) -> None:
        """Set some of the totals (absolute values) and/or last_status (a dict) for a run."""
        unknown = set(fields) - set(self.SWARM_TOTALS) - {"last_status"}
        if unknown:
            raise TypeError(f"set_swarm_stats: unknown field(s) {', '.join(sorted(unknown))}")
        if "last_status" in fields:
            fields["last_status"] = json.dumps(fields["last_status"] or {}, ensure_ascii=False)
        fields["updated"] = time.time()
        cols = ", ".join(fields)
        marks = ", ".join("?" * len(fields))
        sets = ", ".join(f"{k} = excluded.{k}" for k in fields)
        with self._lock:
            self._db.execute(f"INSERT INTO swarm_stats (run_id, {cols}) VALUES (?, {marks}) "
                             f"ON CONFLICT(run_id) DO UPDATE SET {sets}", (run_id, *fields.values()))

    def add_swarm_metric(self, run_id: str, event: dict) -> None:
        """One point of a `swarm` event: the swarm's epoch, loss, peers and samples/s."""
        with self._lock:
            self._db.execute("INSERT INTO swarm_metrics (run_id, time, epoch, loss, peers, samples_per_s) "
                             "VALUES (?, ?, ?, ?, ?, ?)",
                             (run_id, _num(event.get("time")) or time.time(), _num(event.get("epoch")),
                              _num(event.get("loss")), _num(event.get("peers")),
                              _num(event.get("global_samples_per_s"))))

    def swarm_metrics(self, run_id: str) -> dict[str, list]:
        rows = self._q("SELECT time, epoch, loss, peers, samples_per_s FROM swarm_metrics WHERE run_id = ? "
                       "ORDER BY time, id", (run_id,))
        names = ("time", "epoch", "loss", "peers", "samples_per_s")
        return {n: [r[i] for r in rows] for i, n in enumerate(names)}


# ---- a damaged or emptied store --------------------------------------------------------------
DB_NAME = "modron.sqlite3"
_RUN_FOLDER = re.compile(r"^job-(\d+)(-[0-9a-f]+)?$")
_SALVAGE_TABLES = ("jobs", "settings", "metrics", "events", "swarm_stats", "swarm_metrics")


def run_folders(runs_dir: Path) -> list[Path]:
    """Folders under `runs_dir` that hold a run (a job.json)."""
    try:
        return sorted(p for p in Path(runs_dir).iterdir() if (p / "job.json").is_file())
    except OSError:
        return []


def store_problem(path: Path | str) -> str | None:
    """What is wrong with the store file at `path`, in plain words; None when it is sound or absent.

    Damaged pages fail SQLite's quick_check (or any read); an emptied file (0 bytes, or one that
    holds no jobs table) is a problem only when run folders next to it show it once held jobs."""
    path = Path(path)
    if not path.exists():
        return None
    runs = run_folders(path.parent / "runs")
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if size == 0:
        return f"is empty (0 bytes), although {len(runs)} run folder(s) are next to it" if runs else None
    try:
        db = sqlite3.connect(str(path), timeout=10)
        try:
            rows = db.execute("PRAGMA quick_check").fetchall()
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        return f"is damaged ({exc})"
    if rows != [("ok",)]:
        return f"is damaged ({rows[0][0] if rows else 'quick_check gave no answer'})"
    if "jobs" not in tables and runs:
        return f"holds no jobs, although {len(runs)} run folder(s) are next to it"
    return None


@dataclass
class Recovery:
    aside: Path | None                 # where the damaged file now is
    copied: dict[str, int]             # table -> rows copied from it
    found_runs: list[int]              # ids of jobs rebuilt from run folders

    def message(self) -> str:
        parts = []
        if self.aside is not None:
            parts.append(f"The damaged database was kept as {self.aside}.")
        jobs = self.copied.get("jobs", 0)
        if self.copied:
            parts.append(f"{jobs} job(s) and {self.copied.get('metrics', 0):,} chart point(s) could be read from it.")
        if self.found_runs:
            parts.append(f"{len(self.found_runs)} run(s) were found again from their folders and are in History; "
                         "Retry continues one from its last checkpoint.")
        return " ".join(parts)


def _salvage_rows(db: sqlite3.Connection, table: str) -> tuple[list[str], list[tuple]]:
    """(columns, rows) of `table`, reading around damaged pages by rowid where a full scan fails."""
    try:
        cur = db.execute(f"SELECT * FROM {table} LIMIT 0")
        columns = [d[0] for d in cur.description]
    except sqlite3.DatabaseError:
        return [], []
    try:
        top = db.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
        top = top[0] if top else None
    except sqlite3.DatabaseError:
        top = None
    rows: list[tuple] = []
    last, skip = -(2 ** 62), 1
    while skip < 2 ** 40:
        try:
            for row in db.execute(f"SELECT rowid, * FROM {table} WHERE rowid > ? ORDER BY rowid", (last,)):
                rows.append(row[1:])
                last, skip = row[0], 1
            break   # read to the end
        except sqlite3.DatabaseError:
            if top is not None and last >= top:
                break
            last = max(last, 0) + skip   # step over the damaged part, further each time
            skip *= 2
    return columns, rows


def _salvage(path: Path) -> dict[str, tuple[list[str], list[tuple]]]:
    out: dict[str, tuple[list[str], list[tuple]]] = {}
    if not path.exists() or path.stat().st_size == 0:
        return out
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error:
        return out
    try:
        for table in _SALVAGE_TABLES:
            out[table] = _salvage_rows(db, table)
    finally:
        db.close()
    return out


def _move_aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 2
    while aside.exists():
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
        n += 1
    for suffix in ("-wal", "-shm"):   # the write-ahead log belongs with the file it was written for
        extra = path.with_name(path.name + suffix)
        if extra.exists():
            os.replace(extra, aside.with_name(aside.name + suffix))
    os.replace(path, aside)
    return aside


def recover_store(path: Path | str) -> tuple[Store, Recovery]:
    """Keep the file at `path` aside, start a fresh store there with every row that can still be read
    from it, then find the runs on disk that it no longer knows (see `rediscover_runs`)."""
    path = Path(path)
    salvaged = _salvage(path)
    aside = _move_aside(path) if path.exists() else None
    store = Store(path)
    copied: dict[str, int] = {}
    job_ids: set[int] = set()
    with store._lock:
        db = store._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for table in _SALVAGE_TABLES:
                columns, rows = salvaged.get(table, ([], []))
                known = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                keep = [i for i, c in enumerate(columns) if c in known]
                if not rows or not keep:
                    continue
                names = ", ".join(columns[i] for i in keep)
                marks = ", ".join("?" * len(keep))
                n = 0
                for row in rows:
                    values = [row[i] for i in keep]
                    record = dict(zip((columns[i] for i in keep), values))
                    if table in ("metrics", "events") and record.get("job_id") not in job_ids:
                        continue   # its job could not be read
                    try:
                        db.execute(f"INSERT OR IGNORE INTO {table} ({names}) VALUES ({marks})", values)
                    except sqlite3.Error:   # a row damaged in its values: leave it out
                        continue
                    n += 1
                    if table == "jobs":
                        job_ids.add(record.get("id"))
                copied[table] = n
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    found = rediscover_runs(store)
    return store, Recovery(aside, copied, found)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _newest_checkpoint(run_dir: Path) -> tuple[Path | None, dict]:
    """The newest complete checkpoint folder of a run and its trainer state (JSON only: no torch here)."""
    try:
        found = list_checkpoints(run_dir)
    except OSError:
        return None, {}
    for ckpt in reversed(found):
        state = _read_json(ckpt / "trainer_state.json")
        if isinstance(state, dict):
            return ckpt, state
    return None, {}


def rediscover_runs(store: Store) -> list[int]:
    """Add to History every run folder in the store's runs folder that no job of the store names, from
    its job.json and newest checkpoint; returns the new jobs' ids. A job keeps the id its folder is named
    after when that id is free, so new jobs never reuse a folder's number."""
    known_dirs = {str(Path(j.run_dir)) for j in store.list_jobs()}
    known_ids = {j.spec.get("job_id") for j in store.list_jobs()}
    added = []
    for folder in run_folders(store.runs_dir):
        spec = _read_json(folder / "job.json")
        if not isinstance(spec, dict) or str(folder) in known_dirs or (spec.get("job_id") or None) in known_ids - {None}:
            continue
        spec["out"] = str(folder)
        ckpt, state = _newest_checkpoint(folder)
        evals = _read_json(ckpt / "eval.json") if ckpt else None
        evals = evals if isinstance(evals, dict) else {}
        step, total = state.get("step"), state.get("total_steps")
        finished = ckpt is not None and isinstance(step, int) and isinstance(total, int) and step >= total
        summary = {"step": step, "total_steps": total, "loss": state.get("last_loss"),
                   "elapsed_s": state.get("elapsed_s"), "eval_loss": evals.get("eval_loss"),
                   "perplexity": evals.get("perplexity"), "model": spec.get("model"),
                   "checkpoint": str(ckpt) if ckpt else None, "checkpoint_step": step, "found_on_disk": True}
        if finished:
            summary.update(final_loss=state.get("last_loss"), final_eval_loss=evals.get("eval_loss"))
        error = None if finished else (
            "Found again in its run folder after the database was replaced; Retry continues it from "
            + (f"its last checkpoint (step {step})." if ckpt else "the start."))
        try:
            when = (folder / "job.json").stat().st_mtime
        except OSError:
            when = time.time()
        m = _RUN_FOLDER.match(folder.name)
        with store._lock:
            db = store._db
            db.execute("BEGIN IMMEDIATE")
            try:
                wanted = int(m.group(1)) if m else None
                if wanted is not None and db.execute("SELECT 1 FROM jobs WHERE id = ?", (wanted,)).fetchone():
                    wanted = None
                pos = db.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM jobs").fetchone()[0]
                cur = db.execute(
                    "INSERT INTO jobs (id, name, spec, state, position, created, started, finished, error, run_dir, "
                    "summary, attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
                    (wanted, f"{folder.name} (found on disk)", json.dumps(spec),
                     "finished" if finished else "cancelled", pos, when, when, when, error, str(folder),
                     json.dumps(summary)))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        added.append(cur.lastrowid)
    return added
