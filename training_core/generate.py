"""`modron-train generate`: text from a finished run, a checkpoint folder or an exported model (the Playground).

One request per process: the prompt and the sampler settings are options (or --prompt-file for long
prompts). With --json it speaks the worker protocol: `phase` while loading, `token` events as the text
comes (whole characters only, see whole_chars.py), `progress` now and then, and one `result` at the end;
a `stop` control on stdin (or SIGTERM) ends generation between two tokens, and the result says so.
`--compare-base` generates from the base model as well, after the trained one, with the same seed.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

from .errors import CheckpointError, ModelError, UserError, exception_line
from .escapes import unescape

TASK = "generate"
HISTORY_MAX_MESSAGES = 1000           # a --history file's bounds: the Playground's conversations stay far below
HISTORY_MAX_CHARS = 2_000_000
PROGRESS_EVERY_S = 0.5


@dataclasses.dataclass
class Request:
    prompt: str
    mode: str = "story"              # story: plain continuation | chat: the tokenizer's chat template
    system: str = ""
    temperature: float = 0.8         # 0: greedy
    top_p: float = 0.95
    top_k: int = 40                  # 0: off
    repetition_penalty: float = 1.1  # 1: off
    max_new_tokens: int = 200
    stop: tuple[str, ...] = ()
    seed: int = 0
    history: tuple[tuple[str, str], ...] = ()   # chat: the earlier exchanges, (user message, model's reply)


@dataclasses.dataclass
class Source:
    """What to load: a checkpoint (with the job that wrote it) or a plain model folder."""
    path: Path
    ckpt: Path | None = None
    spec: Any = None          # the run's JobSpec
    kind: str = "full"        # full | lora (checkpoints); model (a plain folder)
    warnings: list[str] = dataclasses.field(default_factory=list)   # e.g. a damaged newest checkpoint passed over


# ---- finding and loading the model -------------------------------------------------------
def resolve(path: Path, trust_remote_code: bool = False) -> Source:
    """What `path` names; `trust_remote_code` is the user's --trust-remote-code (never a job.json's)."""
    from .checkpoint import latest_good, problem, read_manifest
    from .export import _job, passed_over
    path = Path(path)
    warnings: list[str] = []
    if not path.is_dir():
        raise CheckpointError(path, "no such run, checkpoint or model folder")
    if (path / "modron_checkpoint.json").is_file():
        ckpt = path
    elif (path / "job.json").is_file() or (path / "checkpoints").is_dir():
        ckpt, skipped = latest_good(path)
        if ckpt is None:
            raise CheckpointError(path, "has no usable checkpoint yet; generate from a finished run")
        if skipped:
            warnings.append(passed_over(skipped, ckpt, "generating from"))
    elif (path / "config.json").is_file():
        return Source(path, kind="model")
    else:
        raise CheckpointError(path, "is not a Modron run, checkpoint or model folder (no job.json, "
                                    "modron_checkpoint.json or config.json)")
    trouble = problem(ckpt)
    if trouble:
        raise CheckpointError(ckpt, f"is damaged ({trouble})")
    kind = read_manifest(ckpt).get("kind", "full")
    if kind not in ("full", "lora"):
        raise CheckpointError(ckpt, f"has unknown kind {kind!r}")
    return Source(path, ckpt=ckpt, spec=_job(ckpt, trust_remote_code), kind=kind, warnings=warnings)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_folder(folder: Path, dtype, trust_remote_code: bool):
    """A plain transformers folder (safetensors only): (model, tokenizer)."""
    from transformers import AutoModelForCausalLM

    from .models.loading import check_loadable, check_model_folder
    from .models.tokenizer import load_tokenizer
    check_model_folder(folder, trust_remote_code)
    check_loadable(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as exc:
        raise ModelError(folder, f"could not be loaded as a causal language model ({_first_line(exc)})") from None
    return model, load_tokenizer(folder)


def load_trained(source: Source, dtype, trust_remote_code: bool = False):
    """(model, tokenizer) of what `source` names; a LoRA checkpoint is its base with the adapter on top
    (not merged, so that `disable_adapter()` gives the base model back for --compare-base)."""
    from transformers import AutoModelForCausalLM

    from .models.tokenizer import load_tokenizer
    if source.kind == "model":
        return _load_folder(source.path, dtype, trust_remote_code)
    ckpt, spec = source.ckpt, source.spec
    tokenizer = load_tokenizer(ckpt / "tokenizer")
    if source.kind == "full":
        from .models.loading import check_loadable
        check_loadable(ckpt / "model")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(ckpt / "model"), use_safetensors=True, dtype=dtype,
                                                         trust_remote_code=spec.trust_remote_code)
        except Exception as exc:   # transformers' own validation of a config it builds nothing from (7 heads...)
            raise CheckpointError(ckpt / "model", f"cannot be loaded ({exception_line(exc)})") from None
        return model, tokenizer
    from peft import PeftModel

    from .models.loading import load_base
    adapter = ckpt / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise CheckpointError(ckpt, "has no adapter/adapter_config.json")
    from safetensors import SafetensorError

    from .checkpoint import check_adapter_config
    check_adapter_config(adapter)
    base = load_base(dataclasses.replace(spec, method="lora"), dtype=dtype)   # never the 4-bit QLoRA base
    from .models.methods import quiet_peft
    try:
        with quiet_peft():
            model = PeftModel.from_pretrained(base.model, str(adapter))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(adapter, f"does not fit the base model ({_first_line(exc)})") from None
    return model, tokenizer


def load_base_model(source: Source, base: str | None, dtype, trust_remote_code: bool = False):
    """(model, tokenizer) of the model the run started from, for --compare-base."""
    if base:
        return _load_folder(Path(base).expanduser(), dtype, trust_remote_code)
    if source.kind == "model":
        raise UserError(source.path, "is an exported model; name its base model with --base FOLDER to compare")
    if source.spec.is_scratch:
        raise UserError(source.path, "was trained from scratch: there is no base model to compare with")
    from .models.loading import load_base
    loaded = load_base(dataclasses.replace(source.spec, method="full"), dtype=dtype)
    return loaded.model, loaded.tokenizer


# ---- one generation ------------------------------------------------------------------------
def prompt_ids(tokenizer, req: Request, context: int | None = None) -> tuple[list[int], tuple[str, ...], int]:
    """The prompt's token ids, the stop sequences (chat without a template stops at the next turn), and how
    many of the oldest exchanges of a chat's history were left out so that the prompt and `max_new_tokens`
    fit the model's `context` (its position limit; None: no limit). The newest message always stays."""
    stops = tuple(s for s in req.stop if s)
    if req.mode == "chat":
        for dropped in range(len(req.history) + 1):
            ids, chat_stops = _chat_ids(tokenizer, req, req.history[dropped:])
            if context is None or len(ids) + req.max_new_tokens <= context:
                break
        return ids, stops + chat_stops, dropped
    ids = tokenizer(req.prompt)["input_ids"] if req.prompt else []
    if not ids:   # an empty story prompt starts from the beginning-of-text token
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start]
    return ids, stops, 0


def _chat_ids(tokenizer, req: Request, history) -> tuple[list[int], tuple[str, ...]]:
    from .data.records import PLAIN_CHAT_STOP, plain_chat
    messages = [{"role": "system", "content": req.system}] if req.system else []
    for user, reply in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": req.prompt})
    if getattr(tokenizer, "chat_template", None):
        from .chat_template import TemplateProblem, render
        try:
            text = render(tokenizer, messages, add_generation_prompt=True)
        except TemplateProblem as exc:   # the model's own Jinja program: a bad one is one line, not a traceback
            raise UserError("--mode chat", str(exc)) from None
        return tokenizer(text, add_special_tokens=False)["input_ids"], ()
    # No template: the very layout the run trained its chat records in (data/records.py).
    return tokenizer(plain_chat(messages, add_generation_prompt=True))["input_ids"], (PLAIN_CHAT_STOP,)


def read_history(path: str) -> tuple[tuple[str, str], ...]:
    """A chat's earlier exchanges from a --history file: a JSON list of {"role": "user" | "assistant",
    "content": text} messages, user first, taking turns, ending with the model's reply. Bounded (the file may
    come from anywhere); any other shape is one plain line naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(HISTORY_MAX_CHARS * 2 + 1)
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:   # (JSONDecodeError is a ValueError)
        raise UserError(path, f"cannot be read as a JSON chat history ({_first_line(exc)})") from None
    if len(text) > HISTORY_MAX_CHARS * 2 or not isinstance(data, list) or len(data) > HISTORY_MAX_MESSAGES:
        raise UserError(path, f"must be a JSON list of at most {HISTORY_MAX_MESSAGES} messages")
    chars = 0
    for i, msg in enumerate(data):
        role = "user" if i % 2 == 0 else "assistant"
        if not (isinstance(msg, dict) and msg.get("role") == role and isinstance(msg.get("content"), str)):
            raise UserError(path, f"message {i + 1} must be {{\"role\": \"{role}\", \"content\": text}} "
                                  "(user and assistant take turns, the user first)")
        chars += len(msg["content"])
    if len(data) % 2:
        raise UserError(path, "must end with the assistant's reply (the new message is --prompt)")
    if chars > HISTORY_MAX_CHARS:
        raise UserError(path, f"holds more than {HISTORY_MAX_CHARS:,} characters")
    return tuple((data[i]["content"], data[i + 1]["content"]) for i in range(0, len(data), 2))


class _Streamer:
    """generate()'s streamer: whole characters out through `on_text`, stop sequences cut off (text that
    could be the start of one is held back until it is clear it is not)."""

    def __init__(self, tokenizer, stops: tuple[str, ...], on_text: Callable[[str, int], None]):
        from .whole_chars import CharStream
        self.chars = CharStream(tokenizer)
        self.stops, self.on_text = stops, on_text
        self.text, self.sent, self.tokens = "", 0, 0
        self.hit_stop = False
        self._prompt_seen = False
        self.last_id: int | None = None

    def put(self, value) -> None:
        if not self._prompt_seen:   # generate() hands over the prompt first
            self._prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        self.tokens += len(ids)
        self.last_id = ids[-1] if ids else self.last_id
        if not self.hit_stop:
            self.text += self.chars.feed(ids)
            self._flush(final=False)

    def end(self) -> None:
        if not self.hit_stop:
            self._flush(final=True)

    def _flush(self, final: bool) -> None:
        cut = min((i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.hit_stop = True
            self.text = self.text[:cut]
            end = cut
        else:
            hold = 0
            if not final:
                for s in self.stops:
                    for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                        if self.text.endswith(s[:k]):
                            hold = k
                            break
            end = len(self.text) - hold
        if end > self.sent:
            self.on_text(self.text[self.sent:end], self.tokens)
            self.sent = end


def run_one(model, tokenizer, req: Request, on_text: Callable[[str, int], None], should_stop: Callable[[], bool],
            device) -> dict:
    """Generate for `req`, calling on_text(new piece, tokens so far); what came out and why it ended."""
    import torch
    from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    from .whole_chars import WholeChars

    ids, stops, dropped = prompt_ids(tokenizer, req, _context(model))
    streamer = _Streamer(tokenizer, stops, on_text)
    stopped = []

    class _Criteria(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if not stopped and should_stop():
                stopped.append(True)
            done = bool(stopped) or streamer.hit_stop
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    kwargs: dict[str, Any] = {"max_new_tokens": req.max_new_tokens, "repetition_penalty": req.repetition_penalty}
    if req.temperature > 0:
        kwargs.update(do_sample=True, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(req.seed)   # the same seed for both streams: a fair comparison
    start = time.monotonic()
    model.eval()
    with torch.no_grad():
        model.generate(input_ids=torch.tensor([ids], device=device),
                       attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                       streamer=streamer, pad_token_id=pad,
                       logits_processor=LogitsProcessorList([WholeChars(tokenizer)]),
                       stopping_criteria=StoppingCriteriaList([_Criteria()]), **kwargs)
    seconds = time.monotonic() - start
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    reason = ("stopped" if stopped else "stop_sequence" if streamer.hit_stop
              else "eos" if streamer.last_id in eos_ids else "length")
    return {"text": streamer.text, "tokens": streamer.tokens, "reason": reason, "seconds": round(seconds, 3),
            "tokens_per_s": round(streamer.tokens / seconds, 2) if seconds > 0 else None,
            "history_dropped": dropped}


def _context(model) -> int | None:
    """How many positions the model can attend over (a chat's history is cut to fit), if its config says."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


# ---- the command ---------------------------------------------------------------------------
def _pick_device(choice: str):
    import torch
    if choice not in ("auto", "cpu", "cuda") and not (choice.startswith("cuda:") and choice[5:].isdigit()):
        raise UserError("--device", f"unknown device {choice!r}; use auto, cpu, cuda or cuda:N")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu"), torch.float32
    if not torch.cuda.is_available():
        raise UserError("--device", f"{choice} was asked for, but no NVIDIA GPU is usable here")
    device = torch.device(choice if choice.startswith("cuda:") else "cuda")
    return device, (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def request_from(args) -> Request:
    if args.prompt_file:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(args.prompt_file, f"cannot be read as UTF-8 text ({_first_line(exc)})") from None
    else:
        prompt = args.prompt or ""
    checks = ((args.temperature >= 0, "--temperature", "must be 0 (greedy) or more"),
              (0 < args.top_p <= 1, "--top-p", "must be above 0 and at most 1"),
              (args.top_k >= 0, "--top-k", "must be 0 (off) or more"),
              (args.repetition_penalty > 0, "--repetition-penalty", "must be above 0 (1 is off)"),
              (1 <= args.max_new_tokens <= 32768, "--max-new-tokens", "must be between 1 and 32768"))
    for ok, flag, problem in checks:
        if not ok:
            raise UserError(flag, problem)
    if args.mode == "chat" and not prompt.strip():
        raise UserError("--prompt", "chat mode needs a message")
    if args.history and args.mode != "chat":
        raise UserError("--history", "is for chat mode (--mode chat)")
    history = read_history(args.history) if args.history else ()
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    return Request(prompt=prompt, mode=args.mode, system=args.system or "", temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                   max_new_tokens=args.max_new_tokens, seed=seed, history=history,
                   stop=tuple(unescape(s) for s in args.stop or ()))   # as the Playground reads them


class _Session:
    """Where events go (protocol lines or a terminal) and whether a stop has come."""

    def __init__(self, json_mode: bool):
        from .controls import Controls
        self.json = json_mode
        self.controls = Controls()
        self.stop_asked = False
        self._lock = threading.Lock()
        self._last_progress = 0.0
        if json_mode:
            from .worker import _event_stream
            self.out = _event_stream()   # stdout carries protocol lines only
        else:
            self.out = sys.stdout

    def emit(self, type_: str, **fields) -> None:
        if not self.json:
            return
        from .protocol import encode, make_event
        with self._lock:
            self.out.write(encode(make_event(type_, **fields)))
            self.out.flush()

    def warn(self, code: str, message: str) -> None:
        """A `warning` event (--json), else a line on stderr: stdout holds the generated text alone."""
        if self.json:
            self.emit("warning", code=code, message=message)
        else:
            sys.stderr.write(f"warning: {message}\n")
            sys.stderr.flush()

    def emit_raw(self, event: dict) -> None:   # read_controls' warnings
        from .protocol import encode
        with self._lock:
            self.out.write(encode(event))
            self.out.flush()

    def should_stop(self) -> bool:
        while True:
            kind = self.controls.poll()
            if kind is None:
                return self.stop_asked
            if kind == "stop":
                self.stop_asked = True

    def text(self, stream: str, piece: str, tokens: int, total: int) -> None:
        if self.json:
            self.emit("token", stream=stream, text=piece)
            now = time.monotonic()
            if now - self._last_progress >= PROGRESS_EVERY_S:
                self._last_progress = now
                self.emit("progress", task=TASK, done=tokens, total=total, unit="tokens", stream=stream)
        else:
            self.out.write(piece)
            self.out.flush()


def cmd_generate(args) -> int:
    session = _Session(args.json)
    if not args.json:
        return _generate(args, session)
    from .controls import StopRequested, read_controls
    from .errors import user_error_from

    def on_control(kind: str) -> None:
        # A stop while a model loads ends the wait in run_setup at once (the loop reads the queued stop).
        if kind == "stop" and not session.controls.polling:
            session.controls.stop()
    # Only a flag (see controls.StopRequested): an exception thrown from a handler can be swallowed.
    signal.signal(signal.SIGTERM, lambda *_: session.controls.stop())
    threading.Thread(target=read_controls, args=(sys.stdin, session.controls, session.emit_raw, on_control),
                     daemon=True).start()
    from .worker import _exit_now
    try:
        code = _generate(args, session)
        # A load a stop abandoned may still run in its helper thread: leave without waiting for it.
        return _exit_now(session.out, code) if session.controls.abandoned is not None else code
    except StopRequested:
        session.emit("result", task=TASK, answer={"stopped": True, "streams": {}})
        return _exit_now(session.out, 0)
    except Exception as exc:
        err = user_error_from(exc)
        if err is None:   # a bug: the app hears it plainly; cli.main logs the traceback
            session.emit("failed", code="internal", message=f"internal error: {type(exc).__name__}: {exc}", step=0)
            raise
        session.emit("failed", code=err.code, message=str(err), step=0)
        sys.stderr.write(f"modron-train: error: {err}\n")
        return 2


def _generate(args, session: _Session) -> int:
    req = request_from(args)
    source = resolve(Path(args.source), args.trust_remote_code)
    for warning in source.warnings:
        session.warn("damaged_checkpoint", warning)
    if args.compare_base and not args.base:
        if source.kind == "model":
            raise UserError(source.path, "is an exported model; name its base model with --base FOLDER to compare")
        if source.spec.is_scratch:
            raise UserError(source.path, "was trained from scratch: there is no base model to compare with")
    trust = args.trust_remote_code   # only the user's word: a checkpoint's job.json may come from anywhere
    device, dtype = _pick_device(args.device)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()   # its "Loading weights" bar on every call is noise on stderr
    what = source.ckpt or source.path
    session.emit("phase", phase="loading_model", message=f"Loading {what} on {device.type}")
    model, tokenizer = session.controls.run_setup(load_trained, source, dtype, trust)   # a stop ends the wait
    model.to(device)
    streams: dict[str, dict] = {}

    def one(name: str, model_, tokenizer_, context=nullcontext()) -> None:
        if not session.json and args.compare_base:
            session.out.write(f"--- {name} ---\n")

        def on_text(piece: str, tokens: int) -> None:
            session.text(name, piece, tokens, req.max_new_tokens)
        session.controls.polling = True
        with context:
            streams[name] = run_one(model_, tokenizer_, req, on_text, session.should_stop, device)
        session.controls.polling = False
        if not session.json:
            session.out.write("\n")

    one("trained", model, tokenizer)
    if args.compare_base and not session.stop_asked:
        from .controls import StopRequested
        try:
            if source.kind == "lora" and not args.base:
                one("base", model, tokenizer, model.disable_adapter())   # the same weights, adapter off
            else:
                del model
                gc.collect()
                session.emit("phase", phase="loading_model", message="Loading the base model to compare")
                base, base_tok = session.controls.run_setup(load_base_model, source, args.base, dtype, trust)
                base.to(device)
                one("base", base, base_tok)
        except StopRequested:   # stopped while the base model loaded: the trained text still counts
            session.stop_asked = True
    answer = {"source": str(source.path), "checkpoint": str(source.ckpt) if source.ckpt else None,
              "device": str(device), "mode": req.mode, "seed": req.seed, "stopped": session.stop_asked,
              "streams": streams}
    session.emit("result", task=TASK, answer=answer)
    return 0


def add_parser(sub) -> None:
    """The `generate` subcommand (cli.py registers it)."""
    g = sub.add_parser("generate", help="generate text from a finished run, a checkpoint or an exported model "
                                        "(--json: token events on stdout, `stop` on stdin)")
    g.add_argument("source", help="run folder (its newest good checkpoint), checkpoint folder, or model folder")
    prompt = g.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="the text to continue (story) or the message (chat)")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the prompt from this UTF-8 file")
    g.add_argument("--mode", choices=("story", "chat"), default="story",
                   help="story: continue the text; chat: the tokenizer's chat template (default: story)")
    g.add_argument("--system", help="chat mode: a system message")
    g.add_argument("--history", metavar="FILE",
                   help='chat mode: the conversation so far, a JSON list of {"role": "user" | "assistant", '
                        '"content": text}; the oldest exchanges are left out when it outgrows the model\'s context')
    g.add_argument("--temperature", type=float, default=0.8, help="randomness; 0 always picks the likeliest "
                                                                  "token (default: 0.8)")
    g.add_argument("--top-p", type=float, default=0.95, help="sample from the smallest set of tokens this likely "
                                                            "(default: 0.95; 1 is off)")
    g.add_argument("--top-k", type=int, default=40, help="sample from the k likeliest tokens (default: 40; 0 is off)")
    g.add_argument("--repetition-penalty", type=float, default=1.1, help="make repeating tokens less likely "
                                                                         "(default: 1.1; 1 is off)")
    g.add_argument("--max-new-tokens", type=int, default=200, help="at most this many tokens (default: 200)")
    g.add_argument("--stop", action="append", metavar="TEXT",
                   help=r"end when this text comes (repeatable); \n is a new line, \t a tab, \\ a backslash")
    g.add_argument("--seed", type=int, help="the same seed and settings give the same text (default: random)")
    g.add_argument("--compare-base", action="store_true", help="also generate from the base model (stream 'base')")
    g.add_argument("--base", metavar="FOLDER", help="the base model to compare with (default: the run's)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="the model's own code may run (a run's job.json never turns this on)")
    g.add_argument("--json", action="store_true", help="speak the worker protocol: events on stdout, controls "
                                                       "on stdin")
    g.set_defaults(func=cmd_generate)


