"""`modron-train` (`python -m training_core.cli`): the headless face of the engine, and its one entry point:
the app starts every piece of engine work as one of these commands (app/engine_client.py).

Exit status: 0 success, 2 bad input (one line on stderr naming the file and the problem),
1 internal error. `--json`: a training command prints the protocol's events, one per line, on stdout;
a one-shot command (validate, plan, export, hardware) prints one JSON document (protocol.encode_answer). `run` always speaks the
protocol, controls on stdin included (docs/protocol.md).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path

from .errors import UserError
from .protocol import encode_answer
from .textout import PROG, TextProgress, json_emitter


# ---- commands --------------------------------------------------------------------------
def _run(spec, args, resume: bool = False) -> int:
    from .controls import Controls
    from .engine import Engine
    controls = Controls()
    interrupted = []

    def on_signal(signum, frame):  # first Ctrl-C: checkpoint and stop; second: leave now
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(signum)
        if controls.polling:
            sys.stderr.write("\nstopping after this step (checkpointing); press Ctrl-C again to quit at once\n")
        controls.stop()   # before the loop runs (loading, tokenizing) this ends set-up at once
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    emit = json_emitter if args.json else TextProgress()
    Engine(spec, emit, controls, resume=resume).run()
    return 0


def job_spec(args):
    """The JobSpec of a `finetune`/`plan` command line: the --spec file's fields (if any), then each option
    given; JobSpec's own defaults for the rest (options left out are absent from `args`)."""
    from .config import CLI_ONLY, JOB, JobSpec, flag, options
    from .errors import ConfigError
    spec_file = getattr(args, "spec", None)
    # The file's own fields, not yet a JobSpec: a field it lacks (e.g. `out`) may come from the command line,
    # so the required-field check waits until both are merged.
    from_file = _read_spec_file(spec_file) if spec_file else {}
    values = dict(from_file)
    given = {f.name: getattr(args, f.name) for f in options(JOB, CLI_ONLY) if hasattr(args, f.name)}
    if given.keys() & {"steps", "epochs"}:   # a length on the command line replaces the file's
        values.pop("steps", None), values.pop("epochs", None)
    values.update(given)
    for name, value in getattr(args, "spec_fallbacks", {}).items():   # plan's --out: "." unless given
        values.setdefault(name, value)
    missing = [name for name in ("model", "data", "out") if name not in values]
    if missing and spec_file:
        raise ConfigError(spec_file, f"missing field(s) {', '.join(missing)} (add them to the file or give "
                                     f"{', '.join(flag(m) for m in missing)})")
    if missing:
        raise UserError(flag(missing[0]), "is required (or give --spec FILE, a job spec in JSON)")
    try:
        return JobSpec.from_dict(values, where=spec_file or "the command line")
    except ConfigError as err:
        # validate() names the flag; a value that came from the file names the file and its field instead.
        names = {flag(f.name): f.name for f in options(JOB, CLI_ONLY)}
        name = names.get(err.where or "")
        if not spec_file or name not in from_file or name in given:
            raise
        problem = err.problem
        for other in from_file.keys() - given.keys():   # "give --steps or --epochs" -> the file's words
            problem = problem.replace(flag(other), other)
        sep = " " if problem.startswith("must") else ": "
        raise ConfigError(spec_file, f"{name}{sep}{problem}") from None


def _read_spec_file(path: str) -> dict:
    """A --spec file's JSON object, or one line naming the file."""
    import json

    from .errors import ConfigError
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(path, "no such file") from None
    except IsADirectoryError:
        raise ConfigError(path, "is a folder, not a job spec file") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(path, "is not a JSON object")
    return data


def cmd_finetune(args) -> int:
    spec = job_spec(args)
    out = Path(spec.out)
    # A folder whose earlier run never wrote a checkpoint holds nothing to lose: start again there.
    if (out / "job.json").exists() and any((out / "checkpoints").glob("ckpt-*")):
        raise UserError(out, f"already holds a run; continue it with `{PROG} resume {out}` or choose another --out")
    return _run(spec, args)


def cmd_plan(args) -> int:
    from .plan import format_plan, plan_job
    plan = plan_job(job_spec(args))
    print(encode_answer(plan) if args.json else format_plan(plan))
    return 0


def cmd_demo(args) -> int:
    from .demo import demo_spec
    spec = demo_spec(args.out)
    if args.steps:
        spec.steps = args.steps
    if not args.json:
        sys.stderr.write(f"Modron demo: a ~1 M-parameter model trained from scratch on the bundled stories "
                         f"(CC0) into {spec.out}\n")
    return _run(spec, args)


def cmd_resume(args) -> int:
    from .config import JobSpec
    run_dir = Path(args.run_dir)
    if not (run_dir / "job.json").is_file():
        raise UserError(run_dir, "is not a Modron run folder (no job.json)")
    spec = JobSpec.load(run_dir / "job.json")
    if spec.trust_remote_code and not args.trust_remote_code:
        # A run folder may have come from anywhere: its job.json alone never runs a model's own code.
        raise UserError(run_dir / "job.json", "lets the model run its own code (trust_remote_code); if you "
                                              "trust its author, resume with --trust-remote-code")
    typed = Path(spec.out)
    if not typed.is_absolute():
        # Written by an older Modron, relative to the folder it was started from: that folder is the run
        # folder minus `out` as it was typed, so its other relative paths can be found from anywhere.
        here = Path(os.path.abspath(run_dir))
        n = len(typed.parts)
        if n and here.parts[-n:] == typed.parts:
            spec = spec.with_absolute_paths(Path(*here.parts[:-n]))
    spec.out = str(run_dir)
    if args.lr is not None:   # e.g. lower after the loss diverged; the schedule goes on at the new height
        import dataclasses
        spec = dataclasses.replace(spec, lr=args.lr)
    return _run(spec, args, resume=True)


def cmd_run(args) -> int:
    from .worker import serve, serve_spare
    if args.spare:
        if args.spec is not None or args.resume:
            raise UserError("run", "--spare takes its job from stdin: give it neither --spec nor --resume")
        return serve_spare()
    if not args.spec:
        raise UserError("run", "say which job: --spec FILE (or --spare, as the app starts one ahead of its job)")
    return serve(args.spec, resume=args.resume)


def cmd_export(args) -> int:
    from .gguf_export import QUANTS
    if args.quant not in QUANTS:   # checked here, not by argparse, for one line instead of its usage text
        raise UserError("--quant", f"{args.quant!r} is not a GGUF type Modron writes; choose one of {', '.join(QUANTS)}")
    if args.gguf or args.gguf_lora or args.gguf_sizes:
        from .gguf_export import cmd_gguf
        return cmd_gguf(args)
    from .export import export_adapter, export_merged, leave_on_sigterm
    if not args.merged and not args.adapter:
        raise UserError("export", "say what to write: --merged OUT, --adapter OUT, --gguf OUT.gguf "
                                  "and/or --gguf-lora OUT.gguf")
    signal.signal(signal.SIGTERM, leave_on_sigterm)   # the app's Cancel: no temporary folder stays
    written: dict = {}
    info: dict = {"warnings": []}
    said: set = set()

    def warn() -> None:   # each once, before the line saying what was written
        for w in info["warnings"]:
            if w not in said and not args.json:
                sys.stderr.write(f"warning: {w}\n")
            said.add(w)
    if args.merged:
        written["merged"] = str(export_merged(Path(args.source), Path(args.merged), info, args.trust_remote_code))
        warn()
        if not args.json:
            print(f"merged model (step {info['step']}) written to {written['merged']}")
    if args.adapter:
        written["adapter"] = str(export_adapter(Path(args.source), Path(args.adapter), info))
        warn()
        if not args.json:
            print(f"adapter (step {info['step']}) written to {written['adapter']}")
    written.update(step=info["step"], warnings=info["warnings"])
    if args.json:
        print(encode_answer(written))
    return 0


def cmd_validate(args) -> int:
    from .data import validate
    tokenizer = None
    if args.model and not args.model.startswith("scratch:"):
        from .models.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(args.model)
    report = validate(args.data, tokenizer=tokenizer)
    if args.json:
        print(encode_answer(report.to_dict()))
    else:
        print(report.format_text())
        if report.tokens is None:
            print(f"tokens: about {report.chars // 4:,} (an estimate; pass --model FOLDER for an exact count)")
    return 0


def cmd_hardware(args) -> int:
    from .hardware import detect, format_report
    report = detect(include_torch=True)
    if args.json:
        print(encode_answer(report.to_dict()))
    else:
        print(format_report(report))
    return 0


def _dashes_ok(text: str) -> str:
    return text.replace("-", "_")   # `--on-divergence lower-lr` reads as the spec's lower_lr


def add_job_args(parser: argparse.ArgumentParser, *, out_help: str | None = None) -> None:
    """The job options `finetune` and `plan` share, made from JobSpec's fields (help, choices, defaults),
    so a new field reaches the CLI without a line here. Options not given stay out of the namespace
    (SUPPRESS) and JobSpec's defaults apply."""
    from .config import CLI_ONLY, JOB, default, flag, options
    parser.add_argument("--spec", metavar="FILE", help="a job spec in JSON (as the app writes it); options "
                                                       "given as well override its fields")
    for f in options(JOB, CLI_ONLY):
        meta, kind = f.metadata, str(f.type)
        text, value = meta["help"], default(f.name)
        if f.name == "out" and out_help is not None:
            text = out_help
        elif value not in (None, [], "") and "default" not in text:
            text += f" (default: {' '.join(value) if isinstance(value, list) else value})"
        kw: dict = {"default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        if kind.startswith("bool"):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            if "list[" in kind:
                kw["nargs"] = "+"
            if meta.get("choices"):
                kw.update(choices=meta["choices"], type=_dashes_ok)
            elif kind.startswith("int"):
                kw["type"] = int
            elif kind.startswith("float"):
                kw["type"] = float
        parser.add_argument(flag(f.name), **kw)


def add_run_parser(sub) -> None:
    w = sub.add_parser("run", help="run a job spec as the app does: protocol events on stdout, controls "
                                   "(pause, resume, stop, checkpoint) on stdin")
    w.add_argument("--spec", metavar="FILE", help="the job spec (JSON)")
    w.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    w.add_argument("--spare", action="store_true",
                   help="import the engine now, say `ready`, then run the job a `job` control on stdin names")
    w.set_defaults(func=cmd_run)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; `command="run"`: the worker's alone (the parser main() uses for
    `run`), without the other commands' modules (swarm, download, GGUF export, the Hub...), whose
    imports cost a worker a few hundred milliseconds of its start-up."""
    p = argparse.ArgumentParser(prog=PROG, description="Modron's training engine, headless.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command == "run":
        add_run_parser(sub)
        return p

    def add_json(sp):
        sp.add_argument("--json", action="store_true", help="print machine-readable JSON")

    d = sub.add_parser("demo", help="train the tiny from-scratch model on the bundled stories (about a minute)")
    d.add_argument("--out", help="run folder (default: a new folder in Modron's data folder)")
    d.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    add_json(d)
    d.set_defaults(func=cmd_demo)

    f = sub.add_parser("finetune", help="train a model on your data")
    add_job_args(f)
    add_json(f)
    f.set_defaults(func=cmd_finetune)

    pl = sub.add_parser("plan", help="check a job before training: memory, disk, time, licence, data")
    add_job_args(pl, out_help="where the run would go (for the free disk space; default: here)")
    pl.set_defaults(spec_fallbacks={"out": "."})   # not out=".": that would override the --spec file's out
    add_json(pl)
    pl.set_defaults(func=cmd_plan)

    r = sub.add_parser("resume", help="continue a run from its last checkpoint")
    r.add_argument("run_dir")
    r.add_argument("--lr", type=float, help="a new peak learning rate from here on (e.g. lower after divergence)")
    r.add_argument("--trust-remote-code", action="store_true",
                   help="agree again that the model's own code may run, for a run started with it on")
    add_json(r)
    r.set_defaults(func=cmd_resume)

    e = sub.add_parser("export", help="write the merged model (and/or adapter) of a run or checkpoint")
    e.add_argument("source", help="run folder or checkpoint folder")
    e.add_argument("--merged", metavar="OUT")
    e.add_argument("--adapter", metavar="OUT")
    e.add_argument("--gguf", metavar="OUT.gguf", help="one GGUF file for llama.cpp/Ollama (a LoRA run: merged), "
                                                     "with an Ollama Modelfile beside it")
    from .gguf_export import QUANTS
    e.add_argument("--quant", default="f16", metavar="{" + ",".join(QUANTS) + "}",
                   help="GGUF weight type (default: f16; the k-quants need llama-cpp-python)")
    e.add_argument("--gguf-lora", metavar="OUT.gguf", help="a LoRA run's adapter as a GGUF LoRA (llama.cpp --lora)")
    e.add_argument("--gguf-sizes", action="store_true", help="print the expected GGUF size per quant")
    e.add_argument("--force", action="store_true", help="replace GGUF files that already exist")
    e.add_argument("--trust-remote-code", action="store_true",
                   help="--merged: the model's own code may run (a run's job.json never turns this on)")
    add_json(e)
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("validate", help="check a dataset and show what Modron will train on")
    v.add_argument("--data", required=True, nargs="+")
    v.add_argument("--model", help="count tokens with this model's tokenizer")
    add_json(v)
    v.set_defaults(func=cmd_validate)

    add_run_parser(sub)

    h = sub.add_parser("hardware", help="show GPUs, CPU and memory")
    add_json(h)
    h.set_defaults(func=cmd_hardware)

    from .swarm.commands import add_parser as add_swarm_parser
    add_swarm_parser(sub)
    from .download import add_parser as add_download_parser
    add_download_parser(sub)
    from .hub_search import add_parser as add_models_parser
    add_models_parser(sub)
    from .generate import add_parser as add_generate_parser
    add_generate_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from .controls import StopRequested
    from .errors import DivergedError, user_error_from
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser("run" if argv[:1] == ["run"] else None).parse_args(argv)
    try:
        return args.func(args)
    except (KeyboardInterrupt, StopRequested):
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except Exception as exc:
        err = user_error_from(exc)   # bad input, or the user's disk (full, read-only, a symlink loop...)
        if err is not None:
            hint = ""
            if isinstance(err, DivergedError) and err.suggested_lr:
                hint = f" (`{PROG} resume {err.where} --lr {err.suggested_lr:g}`)"
            sys.stderr.write(f"{PROG}: error: {err}{hint}\n")
            return 2
        from .paths import data_dir
        log = data_dir() / "last-error.log"
        log.write_text(traceback.format_exc(), encoding="utf-8")
        sys.stderr.write(f"{PROG}: internal error: {type(exc).__name__}: {exc} (details in {log})\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
