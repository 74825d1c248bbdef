"""What the engine's commands print: human lines for a terminal or a log, or protocol lines (--json).

Its own module because both `modron-train` (cli.py) and `modron-train swarm` (swarm/commands.py) print
this way, and cli.py builds the swarm parser: kept in either, the two would import each other.
"""
from __future__ import annotations

import sys
from pathlib import Path

PROG = "modron-train"


class TextProgress:
    """Human output for a terminal (a live bar) or a log file (a line now and then)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr   # looked up now, not at import (tests and callers redirect it)
        self.tty = self.stream.isatty()
        self.last_line_step = -1
        self.total = 0
        self.stepped = False
        self.last_phase = None

    def __call__(self, ev: dict) -> None:
        t = ev["type"]
        if t == "step":
            self.stepped = True
            self.total = ev["total_steps"]
            from .preflight import format_duration
            eta = format_duration(ev["eta_s"]) if ev.get("eta_s") is not None else "?"
            loss = f"{ev['loss']:.4f}" if ev.get("loss") is not None else "nan"
            line = (f"step {ev['step']}/{ev['total_steps']}  loss {loss}  "
                    f"{ev['tokens_per_s']:,.0f} tok/s  ETA {eta}")
            if self.tty:
                width = 24
                done = int(width * ev["step"] / max(1, ev["total_steps"]))
                self.stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {line}   ")
                self.stream.flush()
            elif ev["step"] - self.last_line_step >= max(1, ev["total_steps"] // 20) or ev["step"] == ev["total_steps"]:
                self.stream.write(line + "\n")
                self.last_line_step = ev["step"]
            return
        if self.tty:
            self.stream.write("\r")
        if t == "phase":
            # Until the first step, say what set-up is doing on a terminal: loading a model or tokenizing a
            # dataset can take minutes, and a terminal that shows nothing looks hung. Then the step lines
            # say it. Not in a log or a pipe, where bad input stays one line of stderr.
            if (self.tty and not self.stepped and ev["phase"] != "training"
                    and ev.get("message") != self.last_phase):
                self.last_phase = ev.get("message")
                self._say(str(ev.get("message") or ev["phase"]))
        elif t == "started":
            resumed = f", resumed at step {ev['resumed_from']}" if ev.get("resumed_from") is not None else ""
            self._say(f"Training {ev['model']} ({ev['method']}, {ev['params_total']:,} parameters, "
                      f"{ev['params_trainable']:,} trainable) on {ev['device']} in {ev['precision']}, "
                      f"{ev['total_steps']} steps{resumed}")
        elif t == "preflight":
            from .preflight import format_bytes, verdict_words
            mem = ev["memory"]
            self._say(f"Pre-flight: memory {format_bytes(mem['total'])} estimated, {verdict_words(ev['verdict'])}"
                      + ("; " + "; ".join(ev["advice"]) if ev["advice"] else ""))
            if ev.get("disk"):
                self._say(disk_line(ev["disk"]))
            lic = ev["licence"]
            self._say(f"Licence: {lic['klass']}" + (f" ({lic['name']})" if lic.get("name") else "")
                      + f": {lic['summary']}")
        elif t == "warning":
            self._say(f"warning: {ev['message']}")
        elif t == "eval":
            self._say(f"eval at step {ev['step']}: loss {_num(ev['eval_loss'], '.4f')}, "
                      f"perplexity {_num(ev['perplexity'], '.2f')}")
        elif t == "sample":
            self._say(f"sample: {ev['prompt']!s}{ev['text']!s}".replace("\n", " ")[:200])
        elif t == "checkpoint":
            self._say(f"checkpoint ({ev['reason']}): {ev['path']}")
        elif t == "oom_recovered":
            self._say(ev["message"])
        elif t in ("paused", "resumed"):
            self._say(f"{t} at step {ev['step']}")
        elif t == "stopped":
            run_dir = ev.get("run_dir") or (Path(ev["checkpoint"]).parents[1] if ev.get("checkpoint") else None)
            before = "" if ev.get("checkpoint") else " (before its first checkpoint)"
            self._say(f"stopped at step {ev['step']}{before}"
                      + (f"; continue with: {PROG} resume {run_dir}" if run_dir else ""))
        elif t == "finished":
            loss = f", loss {ev['final_loss']:.4f}" if ev.get("final_loss") is not None else ""
            ev_loss = f", eval loss {ev['final_eval_loss']:.4f}" if ev.get("final_eval_loss") is not None else ""
            self._say(f"finished: step {ev['step']}{loss}{ev_loss}; run folder {ev['run_dir']}")

    def _say(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


def disk_line(disk: dict) -> str:
    """The disk a run needs, one line for the run's pre-flight and `plan` alike."""
    from .preflight import format_bytes, verdict_words
    verdict = "" if disk.get("verdict") == "fits" else f": {verdict_words(disk['verdict'])}"
    return (f"Disk: {format_bytes(disk['needed'])} for checkpoints and the export "
            f"({format_bytes(disk['free'])} free){verdict}")


def _num(value, fmt: str) -> str:
    """A number for a line of text; "nan" for the null that stands for a non-finite one."""
    return format(value, fmt) if isinstance(value, (int, float)) else "nan"


def json_emitter(ev: dict) -> None:
    from .protocol import encode
    sys.stdout.write(encode(ev))
    sys.stdout.flush()
