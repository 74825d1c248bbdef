"""Turn a run's checkpoint into something other tools load: a merged model or a LoRA adapter.

The output folder is built under a temporary sibling name and renamed into place, so a folder
with the final name is always complete; an existing non-empty folder is never overwritten.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .checkpoint import latest_good, problem, read_manifest
from .checkpoint_files import PREFIX, list_checkpoints
from .config import JobSpec
from .errors import CheckpointError, UserError, exception_line
from .fsutil import fsync_dir
from .modelcard import model_card

LICENCE_FILES = ("LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY*", "COPYING*")
CARD_SETTINGS = ("steps", "epochs", "batch_size", "micro_batch_size", "seq_len", "lr", "warmup_steps",
                 "weight_decay", "max_grad_norm", "precision", "seed", "gradient_checkpointing")
LORA_SETTINGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The highest-step complete checkpoint of a run; folders being written (".tmp-…") never count."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _resolve(source: Path, warnings: list[str] | None = None) -> Path:
    """The checkpoint to export: `source` itself, or a run's newest whole one. Passing over a damaged newer
    one is said in `warnings`: the user would otherwise take an older model for the newest."""
    source = Path(source)
    if not source.is_dir():
        raise CheckpointError(source, "no such run or checkpoint folder")
    if (source / "modron_checkpoint.json").is_file():
        ckpt = source
    else:
        ckpt = latest_checkpoint(source)
        if ckpt is None:
            raise CheckpointError(source, "has no finished checkpoint to export (no checkpoints/ckpt-* folder)")
        good, skipped = latest_good(source)
        if good is not None:   # a damaged newest one gives way to the one before it, with a word
            ckpt = good
            if skipped and warnings is not None:
                warnings.append(passed_over(skipped, ckpt, "exported"))
    trouble = problem(ckpt)
    if trouble:
        raise CheckpointError(ckpt, f"is damaged ({trouble}); export an earlier checkpoint of the run")
    return ckpt


def checkpoint_step(ckpt: Path):
    """The step a checkpoint was written at (its manifest's, else its folder name's), or None."""
    try:
        step = read_manifest(ckpt).get("step")
    except CheckpointError:
        step = None
    digits = ckpt.name[len(PREFIX):]
    return step if step is not None else (int(digits) if digits.isdigit() else None)


def _job(ckpt: Path, trust_remote_code: bool = False) -> JobSpec:
    """The job that wrote `ckpt`. Its `trust_remote_code` is the caller's (the user's --trust-remote-code),
    never the file's: a checkpoint may come from anywhere, and its job.json must not turn remote code on."""
    for path in (ckpt / "job.json", ckpt.parent.parent / "job.json"):
        if path.is_file():
            return dataclasses.replace(JobSpec.load(path), trust_remote_code=trust_remote_code)
    raise CheckpointError(ckpt, "has no job.json; cannot tell which base model it belongs to")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# Temporary output folders and files (GGUF export's too) of exports under way in this process, for
# leave_on_sigterm. An output leaves the set before it is renamed into place: from then on it is the user's.
_IN_PROGRESS: set[Path] = set()


def leave_on_sigterm(signum, frame) -> None:
    """SIGTERM handler for `modron-train export` (the app's Cancel): remove the temporary folders and files
    and exit at once. Not an exception: one raised from a handler lands in whatever library code runs (a
    model load, a ctypes callback of llama.cpp's quantizer) and may be swallowed there, and the export
    would go on and publish its file."""
    for tmp in list(_IN_PROGRESS):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(128 + signum)


def _start_output(out: Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(out, "already exists and is a file; choose a new folder to export to")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(out, "already exists and is not empty; choose a new folder to export to")
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep(out)
    tmp = out.parent / f".{out.name}.tmp-export-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _IN_PROGRESS.add(tmp)
    return tmp


def _sweep(out: Path) -> None:
    """Remove the temporary folders of earlier exports to `out` whose process is gone (killed: a Cancel
    that came to a kill, a crash); one still running keeps its own."""
    for p in out.parent.glob(f".{out.name}.tmp-export-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:   # someone else's process: alive
        return True
    return True


def _finish_output(tmp: Path, out: Path) -> Path:
    if out.is_dir():
        out.rmdir()  # checked empty before we started
    _IN_PROGRESS.discard(tmp)   # from here the folder is the user's (a SIGTERM now must not remove it)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    return out


def _base_dir(spec: JobSpec) -> Path | None:
    """The base model's folder if it is on this machine (for its LICENSE files); never downloads."""
    if spec.is_scratch:
        return None
    local = Path(spec.model).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(spec.model, local_files_only=True))
    except Exception:  # not cached, or not a hub id: the card still names the licence
        return None


def _copy_licence_files(base_dir: Path | None, dest: Path) -> None:
    # Most licences require passing their text on with derived weights.
    if base_dir is None:
        return
    for pattern in LICENCE_FILES:
        for f in base_dir.glob(pattern):
            if f.is_file():
                shutil.copy2(f, dest / f.name)


def _write_card(ckpt: Path, spec: JobSpec, manifest: dict, dest: Path) -> None:
    kind = manifest.get("kind", "full")
    hyper = {"method": spec.resolved_method, "trained_steps": manifest.get("step")}
    hyper.update({k: getattr(spec, k) for k in CARD_SETTINGS})
    if kind == "lora":
        hyper.update({k: getattr(spec, k) for k in LORA_SETTINGS})
    card = model_card(
        base_model=spec.model if spec.is_scratch or not Path(spec.model).expanduser().is_dir()
        else Path(spec.model).name,  # a local path would leak the user's folder layout
        licence=_read_json(ckpt / "licence.json"),
        datasets=[Path(d).name or d for d in spec.data],
        hyperparameters=hyper,
        eval=_read_json(ckpt / "eval.json"),
        method=spec.resolved_method,
        created=time.strftime("%Y-%m-%d"),
    )
    (dest / "README.md").write_text(card, encoding="utf-8")


def _merged_model(ckpt: Path, spec: JobSpec, kind: str):
    """(model, base folder or None) with any LoRA adapter folded into the weights."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()   # a "Loading weights" bar on every export says nothing to its user

    if kind == "full":
        from .models.loading import check_loadable
        check_loadable(ckpt / "model")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(ckpt / "model"), use_safetensors=True,
                                                         trust_remote_code=spec.trust_remote_code)
        except Exception as exc:   # transformers' own validation of a config it builds nothing from (7 heads...)
            raise CheckpointError(ckpt / "model", f"cannot be loaded ({exception_line(exc)})") from None
        return model, _base_dir(spec)
    if kind != "lora":
        raise CheckpointError(ckpt, f"has unknown kind {kind!r}")
    from peft import PeftModel

    from .models.loading import load_base
    # Merge into full-precision-as-saved base weights (never the 4-bit QLoRA base).
    from safetensors import SafetensorError

    from .checkpoint import check_adapter_config
    adapter = ckpt / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise CheckpointError(ckpt, "has no adapter/adapter_config.json")
    check_adapter_config(adapter)
    base_spec = dataclasses.replace(spec, method="lora")
    loaded = load_base(base_spec, dtype="auto")
    from .models.methods import quiet_peft
    try:
        with quiet_peft():
            peft_model = PeftModel.from_pretrained(loaded.model, str(adapter))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(adapter, f"does not fit the base model ({str(exc).strip().splitlines()[0]})") from None
    return peft_model.merge_and_unload(), loaded.model_dir


def passed_over(skipped: list, used: Path, did: str) -> str:
    """The word that damaged newest checkpoints (`skipped`, newest first: (folder, trouble)) gave way to `used`:
    else an older model's output passes for the newest one's. `did`: what was done with `used`."""
    (newest, trouble), more = skipped[0], len(skipped) - 1
    also = f" (and {more} more after {used.name})" if more else ""
    return (f"the newest checkpoint {newest.name} is damaged ({trouble}){also}; {did} {used.name} "
            f"(step {checkpoint_step(used)}) instead")


def _tell(info: dict | None, ckpt: Path, warnings: list[str]) -> None:
    if info is not None:
        info.update(checkpoint=str(ckpt), step=checkpoint_step(ckpt))
        info.setdefault("warnings", []).extend(w for w in warnings if w not in info["warnings"])


def export_merged(source: Path, out: Path, info: dict | None = None, trust_remote_code: bool = False) -> Path:
    """A standalone model folder (safetensors, tokenizer, README.md card) from a run or checkpoint.
    `info` (if given) gets the checkpoint, its step and warnings (a damaged newest checkpoint passed over).
    `trust_remote_code`: the user's word that the model's own code may run (a run of such a model needs it)."""
    from .models.tokenizer import load_tokenizer

    warnings_: list[str] = []
    ckpt = _resolve(source, warnings_)
    _tell(info, ckpt, warnings_)
    manifest = read_manifest(ckpt)
    spec = _job(ckpt, trust_remote_code)
    kind = manifest.get("kind", "full")
    out = Path(out)
    tmp = _start_output(out)
    try:
        model, base_dir = _merged_model(ckpt, spec, kind)
        tokenizer = load_tokenizer(ckpt / "tokenizer")
        model.config.use_cache = True  # turned off for training; generation wants it
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if kind == "lora":
            shutil.copytree(ckpt / "adapter", tmp / "adapter")
        _copy_licence_files(base_dir, tmp)
        _write_card(ckpt, spec, manifest, tmp)
        return _finish_output(tmp, out)
    finally:
        _IN_PROGRESS.discard(tmp)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def export_adapter(source: Path, out: Path, info: dict | None = None) -> Path:
    """The LoRA adapter alone (adapter_config.json + adapter_model.safetensors), its tokenizer and a card."""
    warnings_: list[str] = []
    ckpt = _resolve(source, warnings_)
    _tell(info, ckpt, warnings_)
    manifest = read_manifest(ckpt)
    if manifest.get("kind") != "lora":
        raise CheckpointError(ckpt, "is a full finetune, which has no adapter; export the merged model instead")
    adapter = ckpt / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise CheckpointError(ckpt, "has no adapter/adapter_config.json")
    spec = _job(ckpt)
    out = Path(out)
    tmp = _start_output(out)
    try:
        shutil.copytree(adapter, tmp, dirs_exist_ok=True)
        if (ckpt / "tokenizer").is_dir():
            shutil.copytree(ckpt / "tokenizer", tmp, dirs_exist_ok=True)
        _copy_licence_files(_base_dir(spec), tmp)
        _write_card(ckpt, spec, manifest, tmp)
        return _finish_output(tmp, out)
    finally:
        _IN_PROGRESS.discard(tmp)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
