"""Turn the user's files and folders into a sorted list of data files."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError, raise_data_errors

BASE_EXTENSIONS = (".txt", ".md", ".jsonl", ".json", ".csv", ".parquet")
# A gzip of any supported file is supported too ("x.jsonl.gz").
SUPPORTED_EXTENSIONS = BASE_EXTENSIONS + tuple(ext + ".gz" for ext in BASE_EXTENSIONS)


def file_kind(path: Path) -> tuple[str, bool]:
    """('.jsonl', True) for 'x.jsonl.gz'; ('', False) when unsupported."""
    name = path.name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    for ext in BASE_EXTENSIONS:
        if name.endswith(ext):
            return ext, gz
    return "", gz


def _supported_list() -> str:
    return ", ".join(BASE_EXTENSIONS) + " (or any of them .gz)"


def _walk(folder: Path, ancestors: frozenset[str], out: list[Path], skipped: list[Path],
          problems: list[DataError]) -> None:
    # Follow symlinked folders (people link datasets in), but refuse one that leads back
    # into a folder we are already inside: that would recurse forever.
    # A bad entry goes to `problems` and the walk goes on, so every bad one is named at once.
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except PermissionError:
        problems.append(DataError(folder, "permission denied: cannot list this folder"))
        return
    except OSError as exc:
        problems.append(DataError(folder, f"cannot list this folder ({exc.strerror or exc})"))
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue  # .git, .DS_Store, editor swap files
        path = folder / entry.name
        try:
            is_dir = entry.is_dir()  # follows symlinks
        except OSError:
            is_dir = False
        if is_dir:
            real = os.path.realpath(path)
            if real in ancestors:
                problems.append(DataError(path, f"symlink loop: this folder links back to {real}"))
            else:
                _walk(path, ancestors | {real}, out, skipped, problems)
            continue
        try:
            is_file = _is_file(entry, path)
        except DataError as exc:
            problems.append(exc)
            continue
        if is_file:
            (out if file_kind(path)[0] else skipped).append(path)
        elif entry.is_symlink():
            problems.append(DataError(path, "broken symlink: its target does not exist"))


def _is_file(entry: os.DirEntry, path: Path) -> bool:
    try:
        return entry.is_file()   # follows symlinks
    except OSError as exc:       # ELOOP: a link to itself, or two links to each other
        raise DataError(path, f"cannot be followed ({exc.strerror or exc}): a symlink loop? Remove or fix "
                              "this link") from None


def discover_files(paths: list[str | Path], warnings: list[str] | None = None,
                   problems: list[DataError] | None = None) -> list[Path]:
    """Every data file named or found (recursively, sorted) in `paths`, each once.

    Files inside folders with an unsupported extension are skipped (noted in `warnings`
    when given); a file named directly must be supported. Every bad path (missing, a broken
    link, an unsupported file...) is collected: into `problems` when given (the caller goes on
    and reports them with its own), else raised together at the end.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise DataError(None, "no data given: name at least one file or folder")
    collected: list[DataError] = [] if problems is None else problems
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            if path.is_symlink():
                collected.append(DataError(path, "broken symlink: its target does not exist"))
            else:
                collected.append(DataError(path, "no such file or folder"))
            continue
        if path.is_dir():
            files: list[Path] = []
            skipped: list[Path] = []
            before = len(collected)
            _walk(path, frozenset({os.path.realpath(path)}), files, skipped, collected)
            if not files and len(collected) == before:
                detail = f" (found only {_names(skipped)})" if skipped else ""
                collected.append(DataError(path, f"folder has no data files{detail}; "
                                                 f"supported: {_supported_list()}"))
                continue
            if skipped and warnings is not None:
                warnings.append(f"{path}: skipped {len(skipped)} file(s) with unsupported extensions "
                                f"({_names(skipped)})")
            found.extend(files)
        elif path.is_file():
            if not file_kind(path)[0]:
                collected.append(DataError(path, f"unsupported file type; supported: {_supported_list()}"))
            else:
                found.append(path)
        else:
            collected.append(DataError(path, "is not a regular file or folder"))
    if problems is None:
        raise_data_errors(collected)
    # The same file named twice (or reached through a link) would be trained on twice.
    seen: set[str] = set()
    unique = []
    for path in found:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            unique.append(path)
    return unique


def _names(paths: list[Path], limit: int = 3) -> str:
    names = [p.name for p in paths[:limit]]
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(names) + more
