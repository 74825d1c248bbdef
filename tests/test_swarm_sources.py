"""Invites and manifests from strangers: consent before a hub download, and the memory pre-flight.

No test reaches the network: HF_HUB_OFFLINE=1 (conftest), and a cached model card is written by hand."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from training_core.errors import WontFitError
from training_core.swarm.manifest import SwarmManifest, bundled_path, load_manifest, read_invite
from training_core.swarm.sources import (BYTES_VOCAB, PRESET_SHAPES, check_fits, consent_problem,
                                         describe_downloads, manifest_memory, scratch_params)

ROOT = Path(__file__).resolve().parents[1]
DEMO = bundled_path("swarms/demo.toml")
GB = 1024 ** 3


def invite_of(**changes) -> str:
    data = load_manifest(DEMO).to_dict()
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    raw = json.dumps(data).encode()
    return "modron-invite:1:" + base64.urlsafe_b64encode(zlib.compress(raw, 9)).decode().rstrip("=")


def manifest(**changes) -> SwarmManifest:
    return SwarmManifest(**{"run_id": "abc", "model": "scratch:tiny", "data": {"source": "local"}, **changes})


# --- what the pre-flight knows without torch matches what torch builds --------------------------

def test_preset_shapes_and_parameter_counts_match_the_models():
    from training_core.models.presets import PRESETS, count_params, preset_config
    from training_core.models.tokenizer import bytes_tokenizer
    assert {n: (p.hidden_size, p.num_layers, p.num_heads, p.intermediate_size, p.vocab_size)
            for n, p in PRESETS.items()} == PRESET_SHAPES
    assert BYTES_VOCAB == len(bytes_tokenizer())
    for name in ("tiny", "small"):
        assert scratch_params(name, BYTES_VOCAB) == count_params(preset_config(name, vocab_size=BYTES_VOCAB))


def test_the_sources_module_imports_without_torch():
    code = "import sys, training_core.swarm.sources; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False False"


# --- memory -----------------------------------------------------------------------------------

def test_the_demo_fits_and_a_huge_batch_is_refused_in_one_line():
    demo = load_manifest(DEMO)
    est = check_fits(demo, "demo.toml", limit=2 * GB, where_memory="this computer's RAM", device="cpu",
                     precision="fp32")
    assert est is not None and est.total < 1 * GB and est.gradient_checkpointing
    big = manifest(model="scratch:medium", micro_batch=4096, seq_len=32768)
    with pytest.raises(WontFitError) as info:
        check_fits(big, "invite", limit=140 * GB, where_memory="the memory of the NVIDIA H200", device="cuda",
                   precision="bf16")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("invite: this swarm needs about ")
    assert ("scratch:medium, micro_batch 4096 x seq_len 32768, even with gradient checkpointing), more than all "
            "of the memory of the NVIDIA H200 (140 GB); this computer cannot join it") in msg


def test_a_base_models_estimate_comes_from_its_config():
    m = manifest(model="org/base", tokenizer="auto", micro_batch=8, seq_len=256)
    assert manifest_memory(m, device="cpu", precision="fp32") is None          # config not known yet
    config = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000,
              "intermediate_size": 11008}
    est = manifest_memory(m, device="cuda", precision="bf16", config=config)
    assert 6.5e9 * 2 < est.total < 40 * GB           # a 7 B base model in bf16 plus LoRA and activations
    with pytest.raises(WontFitError, match="this computer cannot join it"):
        check_fits(m, "invite", limit=8 * GB, where_memory="the memory of the GPU", device="cuda",
                   precision="bf16", config=config)


# --- consent ----------------------------------------------------------------------------------

def test_consent_names_each_download_and_the_flag():
    m = read_invite(invite_of(model="org/base-model", tokenizer="auto"))
    problem = consent_problem(m, [])
    assert problem == ("this swarm trains with the model 'org/base-model', which would be downloaded from the "
                       "Hugging Face hub (licence: unknown until downloaded: check it on "
                       "https://huggingface.co/org/base-model); to agree, join again with "
                       "--accept-download org/base-model")
    assert consent_problem(m, ["org/base-model"]) is None
    assert "--accept-download org/base-model" in consent_problem(m, ["org/other"])
    tok = read_invite(invite_of(tokenizer="org/tok"))
    assert "the tokenizer 'org/tok'" in consent_problem(tok, [])
    assert consent_problem(load_manifest(DEMO), []) is None


def test_the_licence_class_is_shown_when_the_model_card_is_in_the_cache():
    from huggingface_hub import constants
    repo = "modron-test-org/cached-model-licence"
    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    try:
        snap = folder / "snapshots" / rev
        snap.mkdir(parents=True)
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(rev)
        (snap / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# A model\n", encoding="utf-8")
        (d,) = describe_downloads(read_invite(invite_of(model=repo, tokenizer="auto")))
        assert d.cached and d.licence_class == "non-commercial"
        assert d.licence_text == "non-commercial (CC BY-NC 4.0), from the model card in your download cache"
        problem = consent_problem(read_invite(invite_of(model=repo, tokenizer="auto")), [])
        assert "already in your download cache (licence: non-commercial (CC BY-NC 4.0)" in problem
    finally:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)


# --- the command line: one line, exit 2, in well under seconds, before torch is imported ---------

BIG_MANIFEST = """run_id = "huge"
model = "scratch:medium"
micro_batch = 4096
seq_len = 32768
[data]
source = "bundled"
path = "demo/stories"
"""

SCRIPT = r"""
import io, json, sys, time
from training_core.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err, sys.stderr = sys.stderr, io.StringIO()
    t = time.perf_counter()
    try:
        rc = main(argv)
    finally:
        text, sys.stderr = sys.stderr.getvalue(), err
    results.append({"rc": rc, "s": time.perf_counter() - t, "err": text})
print(json.dumps({"results": results, "torch": "torch" in sys.modules, "hivemind": "hivemind" in sys.modules}))
"""


def test_absurd_invites_and_manifests_are_refused_fast_before_torch(tmp_path):
    big = tmp_path / "huge.toml"
    big.write_text(BIG_MANIFEST, encoding="utf-8")
    cases = {
        "lr = 1e300": invite_of(optimizer={"lr": 1e300}),
        "target_batch_size = 10^40": invite_of(target_batch_size=10 ** 40),
        "averaging_timeout = 1e300": invite_of(averaging_timeout=1e300),
        "micro_batch = 10^8": invite_of(micro_batch=10 ** 8),
        "a local model folder": invite_of(model=str(tmp_path), tokenizer="auto"),
        "a local tokenizer": invite_of(tokenizer=str(tmp_path / "tokenizer.json")),
        "a hub model without consent": invite_of(model="org/base-model", tokenizer="auto"),
    }
    argvs = [["swarm", "join", "--invite", text] for text in cases.values()]
    argvs.append(["swarm", "join", "--manifest", str(big), "--device", "cpu"])
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(argvs)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    words = ["optimizer.lr must be at least 1e-08 and at most 1 (got 1e+300)",
             "target_batch_size must be at least 1 and at most 16777216 (got 1e+40)",
             "averaging_timeout must be at least 1 and at most 3600 (got 1e+300)",
             "micro_batch must be at least 1 and at most 4096 (got 100000000)",
             "model '" + str(tmp_path) + "' is not allowed in an invite",
             "tokenizer '" + str(tmp_path / "tokenizer.json") + "' is not allowed in an invite",
             "--accept-download org/base-model",
             "this swarm needs about"]
    for (name, r), w in zip(list(zip(list(cases) + ["the huge manifest"], report["results"])), words):
        lines = r["err"].strip().splitlines()
        assert r["rc"] == 2 and len(lines) == 1 and lines[0].startswith("modron-train: error: "), (name, r)
        assert w in lines[0], (name, lines[0])
        assert r["s"] < 5.0, (name, r["s"])     # measured well under a second on an idle machine
    assert report["results"][-1]["err"].startswith(f"modron-train: error: {big}: this swarm needs about")
    assert report["torch"] is False and report["hivemind"] is False
