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


class ModelError(UserError):
    code = "bad_model"


class ConfigError(UserError):
    code = "bad_config"


class CheckpointError(UserError):
    code = "bad_checkpoint"


class WontFitError(UserError):
    code = "wont_fit"
