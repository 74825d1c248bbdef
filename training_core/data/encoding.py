"""Open data files as streams of text: gzip, byte-order marks, UTF-8 or Latin-1, binary refusal."""
from __future__ import annotations

import codecs
import contextlib
import gzip
import io
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

from ..errors import DataError

READ_BYTES = 1 << 20
HEAD_BYTES = 64 * 1024

# Things people rename to .txt by accident, named so the error says what the file really is.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"%PDF-", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (or a .docx/.xlsx/.epub file)"),
    (b"\x1f\x8b", "gzip-compressed (name it with a .gz ending)"),
    (b"PAR1", "a Parquet file (name it .parquet)"),
    (b"\x7fELF", "a program, not data"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"\xfd7zXZ\x00", "xz-compressed"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
)

_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32", "utf-32-le"),   # before UTF-16 LE: it starts the same way
    (codecs.BOM_UTF32_BE, "utf-32", "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8-sig", "utf-8 (BOM)"),
    (codecs.BOM_UTF16_LE, "utf-16", "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16", "utf-16-be"),
)

# Control bytes that never appear in text (tab, newlines, form feed and escape do).
_CONTROL = bytes(b for b in range(32) if b not in (9, 10, 12, 13, 27))


class Source:
    """A data file opened for reading: `stream` gives the (decompressed) bytes and
    `position()` how far into the file on disk we are, for progress reports."""

    def __init__(self, path: Path, gz: bool):
        self.path = path
        self.raw: BinaryIO = open(path, "rb")
        self.stream: BinaryIO = gzip.GzipFile(fileobj=self.raw, mode="rb") if gz else self.raw

    def position(self) -> int:
        try:
            return self.raw.tell()
        except (OSError, ValueError):
            return 0

    def close(self) -> None:
        if self.stream is not self.raw:
            self.stream.close()
        self.raw.close()

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def read_errors(path: Path) -> Iterator[None]:
    """Turn failures of reading, decompressing or decoding into one-line DataErrors."""
    try:
        yield
    except gzip.BadGzipFile:
        raise DataError(path, "is not a valid gzip file (the name ends in .gz)") from None
    except EOFError:
        raise DataError(path, "gzip data is truncated (the file was cut off)") from None
    except zlib.error:
        raise DataError(path, "gzip data is damaged") from None
    except UnicodeDecodeError as exc:
        raise DataError(path, f"cannot be decoded as {exc.encoding} text "
                              f"(bad bytes near position {exc.start})") from None
    except PermissionError:
        raise DataError(path, "permission denied: cannot read this file") from None
    except IsADirectoryError:
        raise DataError(path, "is a folder, not a file") from None
    except OSError as exc:  # after BadGzipFile, which is an OSError too
        raise DataError(path, f"cannot read this file ({exc.strerror or exc})") from None


def check_not_empty(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(path, f"cannot read this file ({exc.strerror or exc})") from None
    if size == 0:
        raise DataError(path, "file is empty (0 bytes)")


def _binary_problem(head: bytes) -> str | None:
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return f"is {what}, not text"
    if head and head.count(0) == len(head):
        return "contains only NUL bytes (a damaged or binary file), not text"
    if b"\x00" in head:
        return "contains NUL bytes: it looks like a binary file, not text"
    if head and sum(head.count(c) for c in _CONTROL) > len(head) // 10:
        return "looks like a binary file, not text"
    return None


def detect_encoding(path: Path, gz: bool) -> tuple[str, str, str | None]:
    """(codec for open, label for reports, warning or None). Raises DataError for binary data
    and for a file that holds nothing but whitespace.

    A byte-order mark decides; otherwise the whole file is checked as UTF-8 (streamed:
    a decode pass is far cheaper than tokenizing) and Latin-1 is the fallback, since every
    byte string is valid Latin-1.
    """
    check_not_empty(path)
    with read_errors(path), Source(path, gz) as src:
        head = src.stream.read(HEAD_BYTES)
        if not head:
            raise DataError(path, "file is empty (nothing inside the compressed data)")
        for bom, codec, label in _BOMS:
            if head.startswith(bom):
                if len(head) < HEAD_BYTES and not head.decode(codec, errors="replace").lstrip("\ufeff").strip():
                    raise DataError(path, "contains only whitespace, no text")
                return codec, label, None
        problem = _binary_problem(head)
        if problem:
            raise DataError(path, problem)
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        chunk, blank, codec = head, True, "utf-8"
        while chunk:
            blank = blank and not chunk.strip()
            if codec == "utf-8":
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError:
                    codec = "latin-1"
                    if not blank:
                        break
            chunk = src.stream.read(READ_BYTES)
        if codec == "utf-8":
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:  # the file ends inside a multi-byte character
                codec = "latin-1"
    if blank:
        raise DataError(path, "contains only whitespace, no text")
    if codec == "latin-1":
        return "latin-1", "latin-1", "decoded as Latin-1 (not valid UTF-8); check accented characters"
    return "utf-8", "utf-8", None


def open_text(src: Source, codec: str, newline: str | None = None) -> io.TextIOWrapper:
    """A text stream over `src`; newline=None turns \\r\\n into \\n, '' leaves lines to csv."""
    return io.TextIOWrapper(src.stream, encoding=codec, errors="strict", newline=newline)
