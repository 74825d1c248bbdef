"""Check a dataset before training: formats, counts, warnings and a preview of the rendered text."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError, raise_data_errors
from .cache import cached_or_build, default_cache_dir, tokenizer_fingerprint
from .discover import discover_files
from .formats import FileStats, read_file

PREVIEW_CHARS = 300


@dataclass
class FileReport:
    path: Path
    format: str            # text | alpaca | chat | prompt | mixed
    encoding: str          # utf-8, utf-8 (BOM), utf-16-le, latin-1, parquet ...
    records: int
    chars: int
    tokens: int | None
    warnings: list[str] = field(default_factory=list)
    skipped_empty: int = 0


@dataclass
class ValidationReport:
    files: list[FileReport]
    format: str
    records: int
    tokens: int | None
    chars: int
    preview: list[str]
    warnings: list[str]

    def to_dict(self) -> dict:
        out = asdict(self)
        for f in out["files"]:
            f["path"] = str(f["path"])
        return out

    def format_text(self) -> str:
        tokens = f", {_count(self.tokens, 'token')}" if self.tokens is not None else ""
        lines = [f"{_count(len(self.files), 'file')}, {_count(self.records, 'record')}, "
                 f"{_count(self.chars, 'character')}{tokens}; format: {self.format}"]
        for f in self.files:
            tok = f", {_count(f.tokens, 'token')}" if f.tokens is not None else ""
            lines.append(f"  {f.path}: {f.format}, {f.encoding}, {_count(f.records, 'record')}, "
                         f"{_count(f.chars, 'char')}{tok}")
        if self.warnings:
            lines.append("Warnings:")
            lines.extend(f"  - {w}" for w in self.warnings)
        if self.preview:
            lines.append("Preview:")
            for n, text in enumerate(self.preview, 1):
                body = text.replace("\n", "\n      ")
                lines.append(f"  [{n}] {body}")
        return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _combined_format(formats: list[str]) -> str:
    kinds = set(formats)
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _scan(path: Path, tokenizer: Any) -> FileStats:
    stats = FileStats(path)
    for _ in read_file(path, tokenizer, stats):
        pass
    return stats


def validate(paths, tokenizer: Any = None, preview: int = 3, cache_dir: Path | None = None) -> ValidationReport:
    """Read every file and report what training would see. Bad files raise DataError after all
    were read: every one of them named (DataErrors when several), so one round of fixes is enough.

    With a tokenizer the files are tokenized into the token cache, so a training run that
    follows starts at once.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    warnings: list[str] = []
    problems: list[DataError] = []
    files = discover_files(paths, warnings, problems)
    reports: list[FileReport] = []
    previews: list[str] = []
    fingerprint = tokenizer_fingerprint(tokenizer) if tokenizer is not None else None
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() if tokenizer is not None else None
    for path in files:
        try:
            if tokenizer is not None:
                meta = cached_or_build(path, tokenizer, fingerprint, folder).meta
                rep = FileReport(path, meta["format"], meta["encoding"], meta["records"], meta["chars"],
                                 meta["tokens"], list(meta["warnings"]), meta["empty"])
                file_preview = meta["preview"]
            else:
                s = _scan(path, None)
                rep = FileReport(path, s.format, s.encoding, s.records, s.chars, None, list(s.warnings), s.empty)
                file_preview = s.preview
        except DataError as exc:
            problems.append(exc)
            continue
        reports.append(rep)
        warnings.extend(f"{path}: {w}" for w in rep.warnings)
        previews.extend(file_preview[:max(0, preview - len(previews))])
    raise_data_errors(problems)
    return ValidationReport(
        files=reports,
        format=_combined_format([r.format for r in reports]),
        records=sum(r.records for r in reports),
        tokens=sum(r.tokens for r in reports) if tokenizer is not None else None,
        chars=sum(r.chars for r in reports),
        preview=[p[:PREVIEW_CHARS] for p in previews],
        warnings=warnings,
    )


def iter_texts(paths, tokenizer: Any = None) -> Iterator[str]:
    """Every record's training text, file by file (long .txt files in paragraph-aligned pieces).
    Bad files are skipped and raised together once the good ones are read, as validate() does."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    problems: list[DataError] = []
    for path in discover_files(paths, None, problems):
        try:
            for text, _ in read_file(path, tokenizer):
                yield text
        except DataError as exc:
            problems.append(exc)
    raise_data_errors(problems)
