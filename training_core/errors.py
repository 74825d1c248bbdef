"""Errors that reach the user as one plain line.

`UserError` is bad input (a file, a flag, a model folder): the CLI prints its one line and
exits 2, the worker sends a `failed` event with its code. Anything else is a bug: exit 1.
"""
from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Bad input. `str()` is the whole user-facing line: '<where>: <problem>'."""

    code = "bad_input"

    def __init__(self, where: str | Path | None, problem: str, code: str | None = None):
        self.where = str(where) if where is not None else None
        self.problem = problem
        if code:
            self.code = code
        super().__init__(f"{self.where}: {problem}" if self.where else problem)


class DataError(UserError):
    code = "bad_data"


class DataErrors(DataError):
    """Several bad data files at once, so the user can fix them all in one go: a first line that
    names them, then one indented line per problem (the only multi-line UserError)."""

    def __init__(self, errors: list[DataError]):
        self.errors = sorted(errors, key=lambda e: e.where or "")   # in path order, as a listing reads
        names = [Path(e.where).name if e.where else "?" for e in self.errors[:3]]
        more = f" and {len(self.errors) - 3} more" if len(self.errors) > 3 else ""
        head = f"{len(self.errors)} problems in the data ({', '.join(names)}{more}):"
        super().__init__(None, "\n".join([head, *(f"  {e}" for e in self.errors)]))


def raise_data_errors(errors: list[DataError]) -> None:
    """Raise the one problem as it is, several as one DataErrors; nothing when there are none."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise DataErrors(errors)


class ModelError(UserError):
    code = "bad_model"


class ConfigError(UserError):
    code = "bad_config"


class CheckpointError(UserError):
    code = "bad_checkpoint"


class WontFitError(UserError):
    code = "wont_fit"


class DivergedError(UserError):
    """The loss stopped being a finite number: the run stopped, its last good checkpoint is kept."""
    code = "diverged"

    def __init__(self, where, problem: str, *, step: int, lr: float | None, suggested_lr: float | None,
                 checkpoint: str | None):
        super().__init__(where, problem)
        self.step, self.lr, self.suggested_lr, self.checkpoint = step, lr, suggested_lr, checkpoint


class DiskError(UserError):
    """The disk said no: full, read-only, not allowed. The user's situation, not a bug."""
    code = "disk"


# errno -> what to do about it. The user can fix each of these; none is a bug in Modron.
_OS_ADVICE = {
    "ENOSPC": "no space left on the disk; free some space (or choose a folder on another disk), then resume",
    "EDQUOT": "the disk quota is used up; free some space (or choose a folder on another disk), then resume",
    "EROFS": "is on a read-only file system; choose a folder you can write to",
    "EACCES": "permission denied; choose a folder you can write to, or change its permissions",
    "EPERM": "operation not permitted; choose a folder you can write to, or change its permissions",
    "ELOOP": "symlink loop (too many levels of symbolic links); remove or fix the link",
    "ENAMETOOLONG": "the name is too long for this file system; choose a shorter path",
    "ENOTDIR": "a part of this path is a file, not a folder; choose another path",
    "EISDIR": "is a folder where a file was expected",
    "EEXIST": "already exists and is not a folder; choose another path",
    "EIO": "the disk reported an input/output error; check the disk, then resume",
}
_DISK_FULL_WORDS = ("No space left on device", "StorageFull", "os error 28", "code: 28,", "Disk quota exceeded")


def user_error_from(exc: BaseException) -> UserError | None:
    """The user's situation hidden in a library's exception (a full disk, a read-only folder, a symlink
    loop), as one plain line; None when `exc` looks like a bug."""
    import errno as errno_mod
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno_mod.errorcode.get(exc.errno, "")
        advice = _OS_ADVICE.get(name)
        if advice is None:
            return None
        where = exc.filename if exc.filename is not None else None
        return DiskError(where, advice)
    text = str(exc)
    # Libraries written in Rust or C (safetensors, tokenizers) wrap the OS error in their own type.
    if any(w in text for w in _DISK_FULL_WORDS):
        return DiskError(None, _OS_ADVICE["ENOSPC"])
    return None


def exception_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line for a warning: its type and the first non-empty line of its message
    (compilers and Triton write pages; the first line says what went wrong), with the next one when the first
    only announces it ("Class validation error for validator 'x':")."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [""]
    first = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return f"{type(exc).__name__}: {first}"[:limit]
