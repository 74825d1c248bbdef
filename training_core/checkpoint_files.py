"""Where a run's checkpoints are and which are complete, without torch (checkpoint.py has the rest).

Torch-free so that a worker stopped while it still imports torch (worker.py) can name the run's newest
checkpoint at once instead of waiting for those imports."""
from __future__ import annotations

from pathlib import Path

PREFIX = "ckpt-"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit() and (p / "modron_checkpoint.json").is_file()]
    return sorted(found, key=step_of)


def step_of(ckpt: Path) -> int:
    """The step a checkpoint folder (ckpt-00000120) was written at."""
    return int(Path(ckpt).name[len(PREFIX):])
