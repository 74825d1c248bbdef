"""One install, several GPUs: each device's peer has its own identity and run folder."""
from __future__ import annotations

import pytest

from training_core.errors import ConfigError
from training_core.swarm.manifest import load_manifest
from training_core.swarm.peer import PeerOptions, swarm_engine

import resources


@pytest.fixture
def manifest():
    return load_manifest(resources.path("swarms", "demo.toml"))


def test_each_device_gets_its_own_identity_and_run_folder(manifest, tmp_path, monkeypatch):
    monkeypatch.setenv("MODRON_DATA_DIR", str(tmp_path))
    first = swarm_engine(manifest, PeerOptions(device="cuda:0"), lambda ev: None)
    second = swarm_engine(manifest, PeerOptions(device="cuda:1"), lambda ev: None)
    default = swarm_engine(manifest, PeerOptions(device="auto"), lambda ev: None)
    assert first.strategy.identity_path().name == default.strategy.identity_path().name == "identity.key"
    assert second.strategy.identity_path().name == "identity-cuda1.key"
    assert first.run_dir == default.run_dir == tmp_path / "swarm" / "modron-demo"
    assert second.run_dir == tmp_path / "swarm" / "modron-demo-cuda1"
    assert second.spec.device == "cuda:1"


def test_a_device_that_is_not_one_is_refused_in_one_line(manifest, tmp_path, monkeypatch):
    monkeypatch.setenv("MODRON_DATA_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="is not a device"):
        swarm_engine(manifest, PeerOptions(device="cuda:x"), lambda ev: None)


def test_a_missing_gpu_number_is_a_plain_error(manifest, tmp_path, monkeypatch):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")   # the CPU-only branch of _pick_device is what runs in CI
    monkeypatch.setenv("MODRON_DATA_DIR", str(tmp_path))
    engine = swarm_engine(manifest, PeerOptions(device="cuda:1"), lambda ev: None)
    from training_core import hardware
    with pytest.raises(ConfigError, match="no CUDA GPU is usable here"):
        engine._pick_device(hardware.detect(include_torch=True))
