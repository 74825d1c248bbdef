"""Per-format readers: each streams a file as rendered training texts.

`read_file` yields (text, ends_record) pairs. A record-based file (JSON, CSV, Parquet)
yields one pair per non-empty record. A .txt/.md file is one long document, yielded in
pieces cut at paragraph breaks so memory stays bounded; only its last piece ends the record.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import DataError
from .discover import file_kind
from .encoding import READ_BYTES, Source, check_not_empty, detect_encoding, open_text, read_errors
from .records import detect_schema, no_text_problem, render_record

TXT_PIECE_CHARS = 64 * 1024      # pieces this long keep tokenizer inputs small and parallel
JSON_WHOLE_MAX_BYTES = 512 << 20  # a top-level JSON object is parsed in one go
PARQUET_BATCH_ROWS = 1024
PREVIEW_KEEP = 10
PREVIEW_CHARS = 300

csv.field_size_limit(2**31 - 1)  # long stories in one cell are normal


@dataclass
class FileStats:
    """What reading one file found; filled in as the reader goes."""
    path: Path
    encoding: str = ""
    records: int = 0
    empty: int = 0
    chars: int = 0
    kinds: Counter = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)   # problems without the path in front
    preview: list[str] = field(default_factory=list)
    position: Callable[[], int] = lambda: 0             # bytes of the file on disk read so far

    @property
    def format(self) -> str:
        if not self.kinds:
            return "empty"
        return next(iter(self.kinds)) if len(self.kinds) == 1 else "mixed"

    def add(self, kind: str, text: str) -> bool:
        """Count one rendered record; False when it is empty and should be skipped."""
        if not text.strip():
            self.empty += 1
            return False
        self.records += 1
        self.chars += len(text)
        self.kinds[kind] += 1
        if len(self.preview) < PREVIEW_KEEP:
            self.preview.append(text[:PREVIEW_CHARS])
        return True


def read_file(path: Path, tokenizer: Any = None, stats: FileStats | None = None) -> Iterator[tuple[str, bool]]:
    stats = stats if stats is not None else FileStats(path)
    ext, gz = file_kind(path)
    if ext == ".parquet":
        yield from _read_parquet(path, gz, tokenizer, stats)
    else:
        codec, stats.encoding, warning = detect_encoding(path, gz)
        if warning:
            stats.warnings.append(warning)
        reader = {".txt": _read_txt, ".md": _read_txt, ".jsonl": _read_jsonl,
                  ".json": _read_json, ".csv": _read_csv}[ext]
        with read_errors(path), Source(path, gz) as src:
            stats.position = src.position
            yield from reader(src, codec, path, tokenizer, stats)
            stats.position = lambda size=path.stat().st_size: size
    if stats.records == 0:
        if stats.empty:
            raise DataError(path, f"all {stats.empty} records are empty")
        raise DataError(path, "has no records")
    if stats.empty:
        stats.warnings.append(f"skipped {stats.empty} empty record{'s' if stats.empty != 1 else ''}")


# --- plain text --------------------------------------------------------------------------

def _cut(buf: str) -> int:
    """Where to end a piece: after the last paragraph break in the back 3/4, else the last
    line break, else the last space, else anywhere."""
    low = len(buf) // 4
    for sep in ("\n\n", "\n", " "):
        i = buf.rfind(sep, low)
        if i >= 0:
            return i + len(sep)
    return len(buf)


def _read_txt(src: Source, codec: str, path: Path, tokenizer: Any, stats: FileStats) -> Iterator[tuple[str, bool]]:
    stream = open_text(src, codec)
    buf, pending, chars, seen_text = "", None, 0, False
    while True:
        data = stream.read(TXT_PIECE_CHARS)
        if data:
            buf += data
            if len(buf) < TXT_PIECE_CHARS:
                continue
            cut = _cut(buf)
            piece, buf = buf[:cut], buf[cut:]
        else:
            piece, buf = buf, ""
        if piece:
            chars += len(piece)
            seen_text = seen_text or bool(piece.strip())
            if len(stats.preview) == 0 and piece.strip():
                stats.preview.append(piece.lstrip()[:PREVIEW_CHARS])
            # Hold one piece back so the true last piece can carry ends_record=True.
            if pending is not None:
                yield pending, False
            pending = piece
        if not data:
            break
    if pending is not None and seen_text:  # (blank files were refused by detect_encoding)
        stats.records, stats.chars = 1, chars
        stats.kinds["text"] += 1
        yield pending, True


# --- JSON Lines / JSON -------------------------------------------------------------------

class _Renderer:
    """render_record with the schema remembered per key set (records usually share keys)."""

    def __init__(self, path: Path, tokenizer: Any, stats: FileStats):
        self.path, self.tokenizer, self.stats = path, tokenizer, stats
        self.schemas: dict[tuple, Any] = {}

    def __call__(self, record: Any, where: str) -> str | None:
        schema = None
        if isinstance(record, dict):
            keys = tuple(record)
            if keys not in self.schemas:
                if len(self.schemas) > 1000:  # records with ever-changing keys: don't grow forever
                    self.schemas.clear()
                self.schemas[keys] = detect_schema(list(keys))
            schema = self.schemas[keys]
            if schema is None:
                raise DataError(self.path, f"{where}: {no_text_problem(list(keys))}")
        kind, text = render_record(record, schema, self.tokenizer, where, self.path)
        return text if self.stats.add(kind, text) else None


def _json_problem(exc: json.JSONDecodeError) -> str:
    return f"broken JSON ({exc.msg} at column {exc.colno})"


def _jsonl_lines(lines, path: Path, render: _Renderer, first_line: int = 1) -> Iterator[tuple[str, bool]]:
    for lineno, line in enumerate(lines, first_line):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"line {lineno}: {_json_problem(exc)}") from None
        text = render(record, f"line {lineno}")
        if text is not None:
            yield text, True


def _read_jsonl(src: Source, codec: str, path: Path, tokenizer: Any, stats: FileStats) -> Iterator[tuple[str, bool]]:
    yield from _jsonl_lines(open_text(src, codec), path, _Renderer(path, tokenizer, stats))


_RECORD_LIST_KEYS = ("data", "records", "rows", "examples", "train", "items", "instances")


def _records_in_object(obj: dict, path: Path) -> list:
    if detect_schema(list(obj)) is not None:
        return [obj]  # one record on its own
    for key in _RECORD_LIST_KEYS:
        if isinstance(obj.get(key), list):
            return obj[key]
    lists = [v for v in obj.values() if isinstance(v, list)]
    if len(lists) == 1:
        return lists[0]
    keys = ", ".join(str(k) for k in list(obj)[:12])
    raise DataError(path, "expected a list of records, an object with a 'data' list, or one record "
                          f"with a text field; found keys {keys}")


def _read_json(src: Source, codec: str, path: Path, tokenizer: Any, stats: FileStats) -> Iterator[tuple[str, bool]]:
    stream = open_text(src, codec)
    render = _Renderer(path, tokenizer, stats)
    buf = stream.read(READ_BYTES)
    start = len(buf) - len(buf.lstrip())
    if buf[start:start + 1] == "[":
        yield from _json_array(stream, buf, start + 1, path, render)
        return
    if buf[start:start + 1] != "{":
        raise DataError(path, "expected a JSON list of records or an object")
    # An object: {"data": [...]}, a single record, or JSON Lines saved as .json.
    if path.stat().st_size > JSON_WHOLE_MAX_BYTES:
        raise DataError(path, "top-level JSON object is too large to load; save the records as .jsonl")
    text = buf + stream.read()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several objects: treat as one record per line
            yield from _jsonl_lines(text.split("\n"), path, render)
            return
        raise DataError(path, f"line {exc.lineno}: {_json_problem(exc)}") from None
    for n, record in enumerate(_records_in_object(obj, path), 1):
        out = render(record, f"record {n}")
        if out is not None:
            yield out, True


_WS = re.compile(r"[ \t\n\r]*")


def _json_array(stream, buf: str, pos: int, path: Path, render: _Renderer) -> Iterator[tuple[str, bool]]:
    """Stream the elements of a top-level JSON list without loading the whole file."""
    decoder = json.JSONDecoder()
    line = 1 + buf.count("\n", 0, pos)
    eof, n, want_comma = False, 0, False

    def more() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        data = stream.read(max(READ_BYTES, len(buf) - pos))  # grow fast for one huge record
        buf, pos = buf[pos:] + data, 0
        eof = not data
        return bool(data)

    while True:
        while True:  # skip whitespace, read more when the buffer runs out
            stripped = _WS.match(buf, pos).end()
            line += buf.count("\n", pos, stripped)
            pos = stripped
            if pos < len(buf) or not more():
                break
        if pos >= len(buf):
            raise DataError(path, f"line {line}: broken JSON (the list is not closed with ']')")
        ch = buf[pos]
        if ch == "]":
            rest = buf[pos + 1:].strip() or (stream.read(16).strip() if not eof else "")
            if rest:
                raise DataError(path, f"line {line}: broken JSON (extra data after the closing ']')")
            return
        if want_comma:
            if ch != ",":
                raise DataError(path, f"line {line}: broken JSON (expected ',' or ']' between records)")
            pos += 1
            want_comma = False
            continue
        while True:
            try:
                record, end = decoder.raw_decode(buf, pos)
                if end < len(buf) or eof:
                    break  # a number cut at the buffer's end could look complete; make sure
            except json.JSONDecodeError as exc:
                if eof:
                    raise DataError(path, f"line {line + buf.count(chr(10), pos, exc.pos)}: "
                                          f"{_json_problem(exc)}") from None
            more()
        n += 1
        where = f"record {n} (line {line})"
        line += buf.count("\n", pos, end)
        pos, want_comma = end, True
        out = render(record, where)
        if out is not None:
            yield out, True


# --- CSV -----------------------------------------------------------------------------------

def _delimiter(header_line: str) -> str:
    # Spreadsheets in many locales save ';'-separated "CSV"; tabs happen too.
    if "," in header_line:
        return ","
    for d in (";", "\t", "|"):
        if d in header_line:
            return d
    return ","


def _read_csv(src: Source, codec: str, path: Path, tokenizer: Any, stats: FileStats) -> Iterator[tuple[str, bool]]:
    stream = open_text(src, codec, newline="")
    first = stream.readline()
    lines = _chain_first(first, stream)
    reader = csv.reader(lines, delimiter=_delimiter(first))
    try:
        header = next((row for row in reader if row), None)
        if header is None:
            raise DataError(path, "has no header row and no records")
        header = [h.strip() for h in header]
        schema = detect_schema(header)
        if schema is None:
            raise DataError(path, no_text_problem(header, "columns"))
        if schema[0] == "alpaca" and "output" not in schema[1]:
            raise DataError(path, "has an 'instruction' column but no 'output' (or 'response') column")
        for row in reader:
            if not row:
                continue  # blank line
            if len(row) != len(header):
                raise DataError(path, f"line {reader.line_num}: has {len(row)} fields but the header has "
                                      f"{len(header)} (check quotes and separators)")
            kind, text = render_record(dict(zip(header, row)), schema, tokenizer, f"line {reader.line_num}", path)
            if stats.add(kind, text):
                yield text, True
    except csv.Error as exc:
        raise DataError(path, f"line {reader.line_num}: broken CSV ({exc})") from None


def _chain_first(first: str, rest) -> Iterator[str]:
    yield first
    yield from rest


# --- Parquet -----------------------------------------------------------------------------

def _parquet_problem(exc: Exception) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"is not a readable Parquet file (truncated or damaged?): {first}"


def _read_parquet(path: Path, gz: bool, tokenizer: Any, stats: FileStats) -> Iterator[tuple[str, bool]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    check_not_empty(path)
    stats.encoding = "parquet"
    size = path.stat().st_size
    tmp = None
    try:
        if gz:
            # Parquet needs random access: unpack to a temporary file first.
            fd, tmp = tempfile.mkstemp(suffix=".parquet")
            with os.fdopen(fd, "wb") as out, read_errors(path), Source(path, True) as src:
                shutil.copyfileobj(src.stream, out, READ_BYTES)
        try:
            pf = pq.ParquetFile(tmp or path)
            names = pf.schema_arrow.names
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataError(path, _parquet_problem(exc)) from None
        schema = detect_schema(names)
        if schema is None:
            raise DataError(path, no_text_problem(names, "columns"))
        if schema[0] == "alpaca" and "output" not in schema[1]:
            raise DataError(path, "has an 'instruction' column but no 'output' (or 'response') column")
        total = max(1, pf.metadata.num_rows)
        row = 0
        stats.position = lambda: size * row // total
        try:
            batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=list(schema[1].values()))
            for batch in batches:
                for record in batch.to_pylist():
                    row += 1
                    kind, text = render_record(record, schema, tokenizer, f"row {row}", path)
                    if stats.add(kind, text):
                        yield text, True
        except (pa.ArrowException, OSError) as exc:
            raise DataError(path, _parquet_problem(exc)) from None
    finally:
        if tmp:
            os.unlink(tmp)
