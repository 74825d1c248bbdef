"""Data files shipped with Modron (demo dataset, swarm manifests, icons)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def path(*parts: str) -> Path:
    """Absolute path of a bundled resource."""
    return ROOT.joinpath(*parts)
