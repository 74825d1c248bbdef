"""Self-describing, atomically written checkpoints.

RUN/checkpoints/ckpt-00000120/
  modron_checkpoint.json  what this folder is: format, version, step, kind, files, created
  model/ or adapter/      weights (safetensors) for a full run, or the LoRA adapter
  tokenizer/              the tokenizer the run trains with
  optimizer.safetensors   optimizer tensors; optimizer.json holds the rest of its state
  rng.safetensors         torch RNG states, so dropout continues identically
  trainer_state.json      step, data position, micro-batch, scheduler, metrics so far
  job.json licence.json eval.json samples.json

A folder is written under a ".tmp-" name, fsynced and renamed: a folder named ckpt-* is
always complete. One is deleted by renaming it to a ".trash-" name first, so a kill halfway
through a deletion never leaves a correctly named checkpoint with files missing. Leftover
".tmp-"/".trash-" folders are debris: `clean_debris` removes them when a run starts, and a
failed save removes its own. `latest` skips a checkpoint whose files are missing or whose
safetensors headers are damaged. Nothing here is unpickled: tensors go through safetensors,
the rest JSON.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .checkpoint_files import PREFIX, checkpoints_dir, list_checkpoints, step_of  # noqa: F401  (re-exported)
from .config import MAX_STEPS
from .errors import CheckpointError, DiskError, user_error_from
from .fsutil import fsync_dir

FORMAT = "modron-checkpoint"
VERSION = 1
TMP_PREFIX = ".tmp-"       # a checkpoint being written
TRASH_PREFIX = ".trash-"   # a checkpoint being deleted


def latest(run_dir: Path) -> Path | None:
    """The newest checkpoint that is whole (see `latest_good`)."""
    return latest_good(run_dir)[0]


def latest_good(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint that passes `problem`, [(newer damaged checkpoint, its problem)])."""
    skipped = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        trouble = problem(ckpt)
        if trouble is None:
            return ckpt, skipped
        skipped.append((ckpt, trouble))
    return None, skipped


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be read (its header, and that the file holds all it announces),
    as the library's first line; None when it reads."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as fh:
            fh.keys()
    except Exception as exc:   # SafetensorError, OSError: all mean "damaged"
        text = str(exc).strip().splitlines()
        return text[0] if text else type(exc).__name__
    return None


def problem(ckpt: Path) -> str | None:
    """None when the checkpoint is whole: a valid manifest, every file it lists present, every
    safetensors header readable. Otherwise one line saying what is wrong."""
    try:
        manifest = read_manifest(ckpt)
    except CheckpointError as exc:
        return exc.problem
    for name in manifest.get("files") or []:
        path = Path(ckpt) / name
        if not path.is_file():
            return f"{name} is missing"
        if name.endswith(".safetensors"):
            trouble = safetensors_problem(path)
            if trouble:
                return f"{name} is damaged ({trouble})"
    return None


def job_id_of(ckpt: Path) -> str | None:
    """The job a checkpoint was written for (from its job.json), None if it does not say."""
    try:
        return json.loads((Path(ckpt) / "job.json").read_text(encoding="utf-8")).get("job_id")
    except (OSError, ValueError, AttributeError):
        return None


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for idx, state in sd["state"].items():
        plain_state = {}
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().to("cpu").contiguous().clone()
            else:
                plain_state[name] = value
        plain["state"][str(idx)] = plain_state
    return tensors, plain


def _optimizer_from_files(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in plain["state"].items()}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    return out


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def save(run_dir: Path, step: int, *, model, tokenizer, optimizer, kind: str,
         trainer_state: dict, job: dict, licence: dict, eval_result: dict | None,
         samples: list | None, keep: int, test_sleep: float = 0.0) -> Path:
    """Write checkpoint `step` atomically, then drop all but the newest `keep`.

    A save that fails (a full disk...) removes what it wrote, so the next attempt has the space,
    and raises a DiskError (one line) when the cause is the user's disk. `test_sleep` (tests only)
    pauses halfway through the write and the deletion, so a test can kill the process there.
    """
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _write(tmp, step, model=model, tokenizer=tokenizer, optimizer=optimizer, kind=kind,
               trainer_state=trainer_state, job=job, licence=licence, eval_result=eval_result,
               samples=samples, test_sleep=test_sleep)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        err = user_error_from(exc) if isinstance(exc, Exception) else None
        if err is None:
            raise
        kept = latest(run_dir)
        kept_note = f"; the last good checkpoint, {kept.name}, is kept" if kept is not None else ""
        raise DiskError(err.where or root, f"the checkpoint for step {step} could not be written: "
                                           f"{err.problem}{kept_note}") from None
    if final.exists():  # same step saved twice (e.g. stop right after a periodic save)
        _discard(final, test_sleep)
    os.replace(tmp, final)
    fsync_dir(root)
    prune(run_dir, keep, test_sleep)
    return final


def _write(tmp: Path, step: int, *, model, tokenizer, optimizer, kind: str, trainer_state: dict, job: dict,
           licence: dict, eval_result: dict | None, samples: list | None, test_sleep: float) -> None:
    tmp.mkdir()
    if kind == "lora":
        model.save_pretrained(tmp / "adapter", safe_serialization=True)
    else:
        model.save_pretrained(tmp / "model", safe_serialization=True, max_shard_size="100GB")
    if test_sleep:
        time.sleep(test_sleep)
    tokenizer.save_pretrained(tmp / "tokenizer")
    opt_tensors, opt_plain = _optimizer_to_files(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    _write_json(tmp / "optimizer.json", opt_plain)
    save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
    _write_json(tmp / "trainer_state.json", trainer_state)
    _write_json(tmp / "job.json", job)
    _write_json(tmp / "licence.json", licence)
    _write_json(tmp / "eval.json", eval_result or {})
    _write_json(tmp / "samples.json", samples or [])
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    # The manifest goes last: its presence marks the folder complete even before the rename.
    _write_json(tmp / "modron_checkpoint.json", {
        "format": FORMAT, "version": VERSION, "step": step, "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files,
        "base_model": job.get("model"),
    })
    for p in tmp.rglob("*"):
        if p.is_file():
            with open(p, "rb+") as fh:
                os.fsync(fh.fileno())
    fsync_dir(tmp)


def _discard(ckpt: Path, test_sleep: float = 0.0) -> None:
    """Delete a checkpoint folder: renamed away first (one atomic step), then removed."""
    trash = ckpt.parent / f"{TRASH_PREFIX}{ckpt.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    os.replace(ckpt, trash)
    fsync_dir(ckpt.parent)
    if test_sleep:
        time.sleep(test_sleep)
    shutil.rmtree(trash, ignore_errors=True)


def prune(run_dir: Path, keep: int, test_sleep: float = 0.0) -> None:
    found = list_checkpoints(run_dir)
    for old in found[:-keep] if keep > 0 else []:
        _discard(old, test_sleep)
    clean_debris(run_dir, keep_own=True)


def clean_debris(run_dir: Path, keep_own: bool = False) -> list[str]:
    """Remove what killed saves and deletions left (".tmp-*", ".trash-*"); returns the names removed.
    keep_own: spare this process's own temporary folders."""
    root = checkpoints_dir(run_dir)
    removed = []
    if not root.is_dir():
        return removed
    for junk in root.iterdir():
        if not junk.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            continue
        if keep_own and junk.name.startswith(TMP_PREFIX) and junk.name.endswith(f"-{os.getpid()}"):
            continue
        if junk.is_dir() and not junk.is_symlink():
            shutil.rmtree(junk, ignore_errors=True)
        else:
            junk.unlink(missing_ok=True)
        removed.append(junk.name)
    return removed


def read_manifest(ckpt: Path) -> dict:
    path = Path(ckpt) / "modron_checkpoint.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(ckpt, "is not a Modron checkpoint (no modron_checkpoint.json)") from None
    except ValueError as exc:
        raise CheckpointError(path, f"is damaged ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(path, "is not a Modron checkpoint")
    if not isinstance(manifest.get("version", 0), int) or not isinstance(manifest.get("step", 0), int):
        raise CheckpointError(path, "is damaged (its version and step must be whole numbers)")
    if manifest.get("version", 0) > VERSION:
        raise CheckpointError(path, f"was written by a newer Modron (format {manifest.get('version')})")
    return manifest


# trainer_state.json's numbers: each sizes or steers the resumed run, and a run folder may come from anyone.
STATE_BOUNDS = {"step": (0, MAX_STEPS), "total_steps": (1, MAX_STEPS), "micro_batch": (1, 1 << 20),
                "tokens_seen": (0, 10 ** 18), "data_position": (0, 10 ** 18)}


def read_trainer_state(ckpt: Path) -> dict:
    """trainer_state.json, checked: whole numbers within STATE_BOUNDS, a finite elapsed time and last loss,
    the scheduler's and loss scaler's states as objects (the engine matches them to its own). One line
    naming the file otherwise, never a traceback or a run sized by the file."""
    path = Path(ckpt) / "trainer_state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(path, f"is damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") \
            from None
    if not isinstance(state, dict):
        raise CheckpointError(path, "is damaged (not a JSON object)")
    for name, (low, high) in STATE_BOUNDS.items():
        value = state.get(name, low if name in ("tokens_seen", "data_position") else None)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise CheckpointError(path, f"is damaged ({name} must be a whole number from {low:,} to {high:,})")
    for name in ("elapsed_s", "last_loss"):
        value = state.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or (name == "elapsed_s" and value < 0)):
            raise CheckpointError(path, f"is damaged ({name} must be a finite number)")
    if not isinstance(state.get("scheduler"), dict) or not isinstance(state.get("grad_scaler"), (dict, type(None))):
        raise CheckpointError(path, "is damaged (no scheduler state)")
    return state


def check_adapter_config(adapter: Path) -> None:
    """adapter/adapter_config.json before peft builds the adapter from it: a rank or alpha past any real
    adapter (peft allocates rank x width per layer at once) is one line naming the file."""
    path = Path(adapter) / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(path, f"cannot be read ({str(exc).splitlines()[0] if str(exc) else 'empty'})") from None
    if not isinstance(config, dict):
        raise CheckpointError(path, "is damaged (not a JSON object)")
    for name, high in (("r", 4096), ("lora_alpha", 1 << 16)):
        patterns = config.get({"r": "rank_pattern", "lora_alpha": "alpha_pattern"}[name]) or {}
        if not isinstance(patterns, dict):
            raise CheckpointError(path, f"is damaged (its {name} pattern is not an object)")
        for key, value in [(name, config.get(name, 8)), *patterns.items()]:   # per-layer ranks too
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= high:
                raise CheckpointError(path, f"has {name} {str(value)[:40]} (for {str(key)[:40]}); it must be a "
                                            f"number above 0 and at most {high:,}")


def same_shape(saved: Any, own: Any) -> bool:
    """Whether `saved` (read from a file) has the shape of `own` (an object's state_dict): the same keys, list
    lengths and kinds of value, numbers finite. load_state_dict may then copy in only what it gave
    (the LR scheduler's puts every key of the file into its __dict__)."""
    if isinstance(own, bool) or own is None or isinstance(own, str):
        return type(saved) is type(own)
    if isinstance(own, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool) and math.isfinite(saved)
    if isinstance(own, (list, tuple)):
        return isinstance(saved, list) and len(saved) == len(own) and all(map(same_shape, saved, own))
    if isinstance(own, dict):
        # (a key the file lacks keeps its value: a checkpoint from an older torch may know fewer)
        return isinstance(saved, dict) and saved.keys() <= own.keys() and all(same_shape(saved[k], own[k])
                                                                              for k in saved)
    return False


def read_json(ckpt: Path, name: str) -> Any:
    return json.loads((Path(ckpt) / name).read_text(encoding="utf-8"))


def load_weights(model, ckpt: Path, kind: str) -> None:
    """Load the checkpoint's weights into an already built model (same architecture)."""
    ckpt = Path(ckpt)
    if kind == "lora":
        from peft import set_peft_model_state_dict
        state = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise CheckpointError(ckpt, f"adapter does not match the model ({len(unexpected)} unexpected weights)")
        return
    state: dict[str, torch.Tensor] = {}
    for f in sorted((ckpt / "model").glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        tied = {"lm_head.weight"}
    if unexpected or set(missing) - tied:
        raise CheckpointError(ckpt, f"weights do not match the model (missing {sorted(set(missing) - tied)[:3]}, "
                                    f"unexpected {sorted(unexpected)[:3]})")


def load_optimizer(optimizer: torch.optim.Optimizer, ckpt: Path) -> None:
    ckpt = Path(ckpt)
    plain = read_json(ckpt, "optimizer.json")
    # Its settings (lr, betas...) go into the optimizer as they are: they must be the ones it has, in kind.
    if not isinstance(plain, dict) or not same_shape(plain.get("param_groups"), optimizer.state_dict()["param_groups"]):
        raise CheckpointError(ckpt / "optimizer.json", "is damaged (its parameter groups do not fit this run's)")
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    optimizer.load_state_dict(_optimizer_from_files(tensors, plain))


def load_rng(ckpt: Path) -> None:
    states = load_file(str(Path(ckpt) / "rng.safetensors"))
    torch.set_rng_state(states["cpu"])
    if torch.cuda.is_available():
        cuda = [states[k] for k in sorted(k for k in states if k.startswith("cuda"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
