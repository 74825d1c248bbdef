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
always complete. Nothing here is unpickled: tensors go through safetensors, the rest JSON.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .fsutil import fsync_dir

FORMAT = "modron-checkpoint"
VERSION = 1
PREFIX = "ckpt-"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and (p / "modron_checkpoint.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


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
         samples: list | None, keep: int) -> Path:
    """Write checkpoint `step` atomically, then drop all but the newest `keep`."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    if kind == "lora":
        model.save_pretrained(tmp / "adapter", safe_serialization=True)
    else:
        model.save_pretrained(tmp / "model", safe_serialization=True, max_shard_size="100GB")
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
    if final.exists():  # same step saved twice (e.g. stop right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    prune(run_dir, keep)
    return final


def prune(run_dir: Path, keep: int) -> None:
    found = list_checkpoints(run_dir)
    for old in found[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    # Leftovers of a save that was killed halfway.
    for junk in checkpoints_dir(run_dir).glob(".tmp-*"):
        if not junk.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(junk, ignore_errors=True)


def read_manifest(ckpt: Path) -> dict:
    path = Path(ckpt) / "modron_checkpoint.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(ckpt, "is not a Modron checkpoint (no modron_checkpoint.json)") from None
    except ValueError as exc:
        raise CheckpointError(path, f"is damaged ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(path, "is not a Modron checkpoint")
    if manifest.get("version", 0) > VERSION:
        raise CheckpointError(path, f"was written by a newer Modron (format {manifest.get('version')})")
    return manifest


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
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    plain = read_json(ckpt, "optimizer.json")
    optimizer.load_state_dict(_optimizer_from_files(tensors, plain))


def load_rng(ckpt: Path) -> None:
    states = load_file(str(Path(ckpt) / "rng.safetensors"))
    torch.set_rng_state(states["cpu"])
    if torch.cuda.is_available():
        cuda = [states[k] for k in sorted(k for k in states if k.startswith("cuda"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
