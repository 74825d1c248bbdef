"""Field rules: which keys of a record hold its text, and how a record becomes training text.

Shared by JSON, JSON Lines, CSV and Parquet so every format accepts the same shapes:
  chat      {"messages": [{"role": ..., "content": ...}, ...]}  (ShareGPT "conversations" too)
  alpaca    {"instruction": ..., "input": ..., "output": ...}
  text      {"text": ...} or content / body / story / document / article / passage
  prompt    {"prompt": ..., "completion": ...} (or "response")
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DataError

TEXT_FIELDS = ("text", "content", "body", "story", "document", "article", "passage")
CHAT_FIELDS = ("messages", "conversations")
OUTPUT_FIELDS = ("output", "response")
COMPLETION_FIELDS = ("completion", "response")
ACCEPTED = ("one of " + ", ".join(TEXT_FIELDS) + "; or instruction + output (alpaca); "
            "or prompt + completion; or a messages list (chat)")

# ShareGPT speaks of "human" and "gpt".
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


def _find(keys: dict[str, str], names: tuple[str, ...]) -> str | None:
    for name in names:
        if name in keys:
            return keys[name]
    return None


def detect_schema(fields: list[str]) -> tuple[str, dict[str, str]] | None:
    """('chat'|'alpaca'|'text'|'prompt', role -> actual field name) or None.

    Names match case-insensitively ("Text" in a spreadsheet header works).
    """
    keys: dict[str, str] = {}
    for f in fields:
        keys.setdefault(str(f).strip().lower(), f)
    chat = _find(keys, CHAT_FIELDS)
    if chat:
        return "chat", {"messages": chat}
    if "instruction" in keys:
        got = {"instruction": keys["instruction"]}
        out = _find(keys, OUTPUT_FIELDS)
        if out:
            got["output"] = out
        if "input" in keys:
            got["input"] = keys["input"]
        return "alpaca", got
    text = _find(keys, TEXT_FIELDS)
    if text:
        return "text", {"text": text}
    if "prompt" in keys:
        comp = _find(keys, COMPLETION_FIELDS)
        if comp:
            return "prompt", {"prompt": keys["prompt"], "completion": comp}
    return None


def no_text_problem(fields: list[str], what: str = "fields") -> str:
    shown = ", ".join(str(f) for f in fields[:12]) + (" ..." if len(fields) > 12 else "")
    found = f"found {what} {shown}" if fields else f"found no {what}"
    noun = "column" if what == "columns" else "field"
    return f"no text {noun}: {found}; expected {ACCEPTED}"


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _as_text(value: Any, field: str, where: str, path: Path) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise DataError(path, f"{where}: field '{field}' is {_kind_of(value)}, not text")


def _message_text(content: Any, where: str, path: Path, n: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI-style parts: [{"type": "text", "text": ...}]
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return "".join(p for p in parts if isinstance(p, str))
    raise DataError(path, f"{where}: message {n} has content that is {_kind_of(content)}, not text")


def _chat_messages(value: Any, field: str, where: str, path: Path) -> list[dict[str, str]]:
    if isinstance(value, str):  # a JSON list stored in a CSV cell
        try:
            value = json.loads(value)
        except ValueError:
            raise DataError(path, f"{where}: field '{field}' is text, not a list of messages") from None
    if not isinstance(value, list):
        raise DataError(path, f"{where}: field '{field}' is {_kind_of(value)}, not a list of messages")
    messages = []
    for n, msg in enumerate(value, 1):
        if not isinstance(msg, dict):
            raise DataError(path, f"{where}: message {n} is {_kind_of(msg)}, not an object with role and content")
        role = msg.get("role", msg.get("from"))
        if not isinstance(role, str) or not role.strip():
            raise DataError(path, f"{where}: message {n} has no 'role' (each message needs 'role' and 'content')")
        role = role.strip().lower()
        role = _ROLE_ALIASES.get(role, role)
        content = msg["content"] if "content" in msg else msg.get("value")
        messages.append({"role": role, "content": _message_text(content, where, path, n)})
    return messages


# A chat's layout where the tokenizer has no chat template (a from-scratch run's never has one): training
# renders records with it, and `generate --mode chat` prompts with it, stopping where the next user turn begins.
PLAIN_CHAT_STOP = "\n\n### User:"


def plain_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    text = "\n\n".join(f"### {m['role'].capitalize()}:\n{m['content']}" for m in messages)
    return text + "\n\n### Assistant:\n" if add_generation_prompt else text


def render_chat(messages: list[dict[str, str]], tokenizer: Any, where: str, path: Path) -> str:
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if template:
        from ..chat_template import TemplateProblem, render
        try:
            return render(tokenizer, messages)
        except TemplateProblem as exc:  # jinja raises its own errors, e.g. "roles must alternate"
            raise DataError(path, f"{where}: {exc}") from None
    return plain_chat(messages)


def render_record(record: Any, schema: tuple[str, dict[str, str]] | None, tokenizer: Any,
                  where: str, path: Path) -> tuple[str, str]:
    """(format, text); text is '' for an empty record. `schema` None: detect from this record."""
    if isinstance(record, str):
        return "text", record
    if not isinstance(record, dict):
        raise DataError(path, f"{where}: expected an object with a text field, found {_kind_of(record)}")
    if schema is None:
        schema = detect_schema(list(record))
        if schema is None:
            raise DataError(path, f"{where}: {no_text_problem(list(record))}")
    kind, f = schema
    if kind == "text":
        return kind, _as_text(record.get(f["text"]), f["text"], where, path)
    if kind == "chat":
        messages = _chat_messages(record.get(f["messages"]), f["messages"], where, path)
        if not any(m["content"].strip() for m in messages):
            return kind, ""
        return kind, render_chat(messages, tokenizer, where, path)
    if kind == "alpaca":
        if "output" not in f:
            raise DataError(path, f"{where}: has 'instruction' but no 'output' (or 'response') field")
        instruction = _as_text(record.get(f["instruction"]), f["instruction"], where, path)
        output = _as_text(record.get(f["output"]), f["output"], where, path)
        extra = _as_text(record.get(f["input"]), f["input"], where, path) if "input" in f else ""
        if not (instruction.strip() or output.strip()):
            return kind, ""
        parts = [f"### Instruction:\n{instruction}"]
        if extra.strip():
            parts.append(f"### Input:\n{extra}")
        parts.append(f"### Response:\n{output}")
        return kind, "\n\n".join(parts)
    # prompt / completion: the completion simply continues the prompt.
    prompt = _as_text(record.get(f["prompt"]), f["prompt"], where, path)
    completion = _as_text(record.get(f["completion"]), f["completion"], where, path)
    if not (prompt.strip() or completion.strip()):
        return kind, ""
    return kind, prompt + completion
