"""Rendering a tokenizer's chat template, bounded in time.

A chat template is a Jinja program from the model's author, and a downloaded one may loop for hours
(transformers renders it in Jinja's sandbox, which stops attribute escapes but not a nested
`range(100000)`). Jinja has no time limit, so a watchdog thread raises TemplateTimeout inside a render
that runs past TEMPLATE_SECONDS (CPython's PyThreadState_SetAsyncExc: Jinja's compiled templates are
Python code, so it lands at the template's next step). Any error the template raises (its own
`raise_exception`, a sandbox refusal, a syntax error) comes back as the same one-line TemplateProblem.
The render runs in the caller's thread: a thread per record cost ~150 µs, six times the render itself.

Not bounded: memory. A template that writes gigabytes in one expression (`'A' * 2000000000`) allocates
them in one C call, before any check can see the text.
"""
from __future__ import annotations

import ctypes
import threading
import time
from typing import Any

TEMPLATE_SECONDS = 10.0        # one conversation; real templates take well under a millisecond
MAX_CHARS = 100_000_000        # what one rendered conversation may hold
WATCH_EVERY_S = 0.1


class TemplateProblem(Exception):
    """The chat template failed, took too long or wrote too much (the message is one plain line)."""


class TemplateTimeout(BaseException):
    """Raised inside a render that ran too long (a BaseException: templates' `except Exception` pass it on)."""


_lock = threading.Lock()
_deadlines: dict[int, float] = {}    # thread id -> when its render must end
_watchdog: threading.Thread | None = None


def _watch() -> None:
    while True:
        time.sleep(WATCH_EVERY_S)
        now = time.monotonic()
        with _lock:
            for tid, deadline in list(_deadlines.items()):
                if now > deadline:
                    del _deadlines[tid]   # once: the render ends at its next step
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(TemplateTimeout))


def _checkpoint() -> None:
    """A Python call: an exception the watchdog set just before the render's deadline was cleared lands here,
    inside render()'s try, never later in the caller's code."""


def render(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> str:
    """tokenizer.apply_chat_template(messages, tokenize=False, **kwargs), within TEMPLATE_SECONDS."""
    global _watchdog
    tid = threading.get_ident()
    try:
        with _lock:
            if _watchdog is None:
                _watchdog = threading.Thread(target=_watch, name="chat-template-watchdog", daemon=True)
                _watchdog.start()
            _deadlines[tid] = time.monotonic() + TEMPLATE_SECONDS
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        finally:
            with _lock:
                _deadlines.pop(tid, None)
            _checkpoint()
    except TemplateTimeout:
        raise TemplateProblem(f"the chat template did not finish within {TEMPLATE_SECONDS:g} s") from None
    except Exception as exc:   # RecursionError and jinja's own errors end here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise TemplateProblem(f"the chat template failed ({type(exc).__name__}: {first})") from None
    if not isinstance(text, str):
        raise TemplateProblem(f"the chat template gave {type(text).__name__}, not text")
    if len(text) > MAX_CHARS:
        raise TemplateProblem(f"the chat template wrote {len(text):,} characters for one conversation")
    return text
