"""The worker protocol: the one place that defines what crosses the worker's pipes.

Worker -> parent: newline-delimited JSON events on stdout, one object per line.
Parent -> worker: newline-delimited JSON control messages on stdin.

Every message carries `"v": PROTOCOL_VERSION` and `"type"`. Events also carry `"time"`
(Unix seconds). Readers must ignore fields they do not know (new optional fields do not
bump the version); a removed or renamed field, or a changed meaning, does.
The schema is documented in docs/protocol.md; `EVENTS` and `CONTROLS` below are the source
of truth and tests check the two agree.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any

PROTOCOL_VERSION = 1

# The engine's one entry point: all engine work the app asks for is `python -m ENTRY_MODULE COMMAND ...`
# (`modron-train`): `run --spec` and `swarm join --json` speak this protocol; validate, plan and export
# answer with one JSON document (--json).
ENTRY_MODULE = "training_core.cli"

# type -> required fields. Optional fields are listed in docs/protocol.md.
EVENTS: dict[str, tuple[str, ...]] = {
    "started": ("job_id", "run_dir", "device", "precision", "method", "model",
                "params_total", "params_trainable", "total_steps", "resumed_from"),
    "preflight": ("memory", "disk", "licence", "verdict", "advice"),
    "step": ("step", "total_steps", "epoch", "loss", "lr", "tokens_per_s", "samples_per_s",
             "vram_used", "vram_reserved", "ram_used", "eta_s", "elapsed_s", "tokens_seen"),
    "eval": ("step", "eval_loss", "perplexity"),
    "sample": ("step", "prompt", "text"),
    "checkpoint": ("step", "path", "reason"),
    "warning": ("code", "message"),
    "oom_recovered": ("step", "old_micro_batch", "new_micro_batch", "grad_accum", "message"),
    "paused": ("step", "vram_used", "checkpoint"),
    "resumed": ("step",),
    "finished": ("step", "run_dir", "final_loss", "final_eval_loss", "checkpoint", "elapsed_s"),
    "stopped": ("step", "checkpoint"),   # after a `stop` control: checkpointed, exiting 0
    "failed": ("code", "message", "step"),
    # Swarm contribution (`modron-train swarm join/host --json`); the worker events above still apply.
    # `swarm`: the DiLoCo fields (algorithm, round, phase, next_exchange_s, round_bytes_*, round_peers) stay
    # optional so that older, sync-only workers still speak version 1.
    "swarm": ("role", "run_id", "peers", "epoch", "samples_contributed", "bytes_up", "bytes_down"),
    "invite": ("run_id", "invite", "maddrs"),
    # What a worker is doing before and around training (loading, downloading, tokenizing, ...), so that
    # no run shows a bare "running": `phase` is one of PHASES; `done`/`total` optional (see docs/protocol.md).
    "phase": ("phase", "message"),
    # Long one-shot tasks (a GGUF export, a model download, generation) speak this protocol too:
    # `progress` while they work, `result` once at the end with what `--json` would have printed.
    "progress": ("task", "done", "total"),
    "result": ("task", "answer"),
    # Generation (the Playground): text as it is produced, whole characters only; `stream` names the model.
    "token": ("stream", "text"),
    # A spare worker (`run --spare`) has imported the engine and waits for its `job` control.
    "ready": ("pid",),
}

# The phases a `phase` event names, in the order a run goes through them.
PHASES = ("downloading", "loading_model", "tokenizing", "placing", "first_step", "training", "evaluating",
          "checkpointing", "exporting", "finishing")

CONTROLS: dict[str, tuple[str, ...]] = {
    "pause": (),        # checkpoint, free accelerator memory, wait for resume/stop
    "resume": (),
    "stop": (),         # checkpoint, send `stopped`, exit 0
    "checkpoint": (),   # write a checkpoint now and go on
    "job": ("spec", "resume"),   # a spare worker's first line only: run this job spec (cli.py `run --spare`)
}


class ProtocolError(ValueError):
    """A line that is not a valid message of this protocol version."""


def _clean(value: Any) -> Any:
    # JSON has no NaN/Infinity; send null so every reader can parse the line.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def make_event(type_: str, **fields: Any) -> dict[str, Any]:
    if type_ not in EVENTS:
        raise ProtocolError(f"unknown event type {type_!r}")
    missing = [f for f in EVENTS[type_] if f not in fields]
    if missing:
        raise ProtocolError(f"event {type_!r} lacks {', '.join(missing)}")
    return {"v": PROTOCOL_VERSION, "type": type_, "time": time.time(), **_clean(fields)}


def make_control(type_: str, **fields: Any) -> dict[str, Any]:
    if type_ not in CONTROLS:
        raise ProtocolError(f"unknown control type {type_!r}")
    return {"v": PROTOCOL_VERSION, "type": type_, **fields}


def encode(message: dict[str, Any]) -> str:
    """One line of JSON, newline included."""
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n"


def _decode(line: str | bytes, table: dict[str, tuple[str, ...]], what: str) -> dict[str, Any]:
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{what} is not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    if msg.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"{what} has protocol version {msg.get('v')!r}, expected {PROTOCOL_VERSION}")
    type_ = msg.get("type")
    if type_ not in table:
        raise ProtocolError(f"{what} has unknown type {type_!r}")
    missing = [f for f in table[type_] if f not in msg]
    if missing:
        raise ProtocolError(f"{what} {type_!r} lacks {', '.join(missing)}")
    return msg


def decode_event(line: str | bytes) -> dict[str, Any]:
    return _decode(line, EVENTS, "event")


def decode_control(line: str | bytes) -> dict[str, Any]:
    return _decode(line, CONTROLS, "control message")


def encode_answer(doc: dict[str, Any]) -> str:
    """A one-shot command's answer (validate, plan, export, hardware with --json): one JSON document,
    versioned like every message here so that the app can tell an engine of another version."""
    return json.dumps({"v": PROTOCOL_VERSION, **_clean(doc)}, indent=2, ensure_ascii=False, allow_nan=False)


def decode_answer(text: str | bytes) -> dict[str, Any]:
    """The document of `encode_answer`, without its "v"; ProtocolError when it is not one of this version."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"the answer is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError("the answer is not a JSON object")
    if doc.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"the answer has protocol version {doc.get('v')!r}, expected {PROTOCOL_VERSION}")
    return {k: v for k, v in doc.items() if k != "v"}
