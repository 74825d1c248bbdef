r"""Backslash escapes in short texts typed on one line (stop sequences): `\n` a new line, `\t` a tab, `\\`
a backslash; any other backslash stays as typed. The Playground's field and `generate --stop` read them
alike, and the app writes its stop sequences back in this form on the engine's command line.

Torch-free and dependency-free: the app imports it (pyproject's import-linter list).
"""
from __future__ import annotations

import re

_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}
_ESCAPED = re.compile(r"\\([nt\\])")


def unescape(text: str) -> str:
    r"""`\n`, `\t` and `\\` into the characters they name, in one left-to-right pass (so `\\n` is a
    backslash and an n, not a backslash and a new line)."""
    return _ESCAPED.sub(lambda m: _ESCAPES[m.group(1)], text)


def escape(text: str) -> str:
    """The inverse of unescape: unescape(escape(s)) == s for any text."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
