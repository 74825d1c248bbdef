"""The model picker: the catalogue, the fit marks (the engine's own memory figures against a given GPU), the
picker dialog offscreen (choosing fills New finetune's model, local folders checked plainly, a download
from a fake hub on 127.0.0.1 with its progress and Cancel)."""
from __future__ import annotations

import json

import pytest

from app.views.model_picker import ABOUT_COLUMN, GGUF_COLUMN, HUB_ID_ROLE, METHOD_COLUMN, VERDICT_ROLE, ModelPicker
from app.views.new_finetune import HUB, LOCAL, NewFinetuneView
from tests.hub_helpers import CONFIG, REPO, SHA, FakeHub, safetensors_bytes, tiny_repo
from training_core import catalog, preflight
from training_core.config import JobSpec
from training_core.hardware import GpuInfo, HardwareReport
from training_core.licence import CLASSES, classify

GiB = 1024 ** 3


def gpu(free_gb: float, bf16: bool = True) -> GpuInfo:
    return GpuInfo(index=0, name="Test GPU", uuid=None, vram_total=int(24 * GiB), vram_used=0,
                   vram_free=int(free_gb * GiB), compute_capability=(8, 6) if bf16 else (5, 2), bf16=bf16,
                   fp16_fast=bf16, temperature_c=None, utilization_pct=None, power_w=None)


def report(card: GpuInfo | None) -> HardwareReport:
    return HardwareReport(gpus=[card] if card else [], driver_version=None, cuda_driver_version=None, nvml="ok",
                          torch=None, cpu_model="cpu", cpu_cores_physical=2, cpu_cores_logical=2,
                          ram_total=int(16 * GiB), ram_available=int(12 * GiB))


# ---- the catalogue ------------------------------------------------------------------------------
def test_the_catalogue_is_a_short_list_of_well_formed_open_models():
    assert 6 <= len(catalog.CATALOG) <= 10
    ids = [m.hub_id for m in catalog.CATALOG]
    assert len(set(ids)) == len(ids) and all(catalog.is_hub_id(i) and "/" in i for i in ids)
    for m in catalog.CATALOG:
        assert m.licence_class in CLASSES and m.licence_class == classify(m.licence_id, None)[0] == "permissive"
        # The figures come from the config numbers: they must describe the model said.
        assert abs(catalog.llama_params(m.config) / m.params - 1) < 0.2, m.hub_id
        assert preflight.min_params_from_config(m.config) <= m.params
        assert 1.5 <= m.download_bytes / m.params <= 4.5, m.hub_id   # 16-bit or 32-bit safetensors
        assert m.note and "\n" not in m.note and m.architecture
    assert not catalog.is_hub_id("../etc") and not catalog.is_hub_id("a/b/c") and not catalog.is_hub_id("")


def test_each_model_says_whether_it_exports_to_gguf(qtbot):
    """The GGUF export writes a few architectures (gguf_export.ARCHS): the picker says which models those are,
    so whoever wants KoboldCpp or Ollama sees it before training, not at export."""
    from training_core.gguf_export import ARCHS
    assert catalog.GGUF_MODEL_TYPES == set(ARCHS)
    for m in (*catalog.CATALOG, *catalog.PRESETS):
        assert m.model_type == {"GPT-NeoX": "gpt_neox", "Qwen2": "qwen2"}.get(m.architecture, "llama"), m.hub_id
        assert m.gguf_export == (m.model_type in ARCHS)
    assert not next(m for m in catalog.CATALOG if m.hub_id == "EleutherAI/pythia-160m").gguf_export
    picker = ModelPicker(report=report(None))
    qtbot.addWidget(picker)
    assert picker.table.horizontalHeaderItem(GGUF_COLUMN).text() == "GGUF"
    for row, m in enumerate((*catalog.CATALOG, *catalog.PRESETS)):
        cell, about = picker.table.item(row, GGUF_COLUMN), picker.table.item(row, ABOUT_COLUMN).text()
        if m.gguf_export:
            assert cell.text() == "yes" and "KoboldCpp" in cell.toolTip() and "GGUF" not in about
        else:
            assert cell.text().startswith("no") and "cannot go to" in cell.toolTip() and "KoboldCpp" in cell.toolTip()
            assert about.endswith("GGUF export: no")


def test_the_presets_are_modrons_own():
    from training_core.models.presets import PRESETS, count_params, preset_config
    assert [m.hub_id for m in catalog.PRESETS] == [f"scratch:{n}" for n in PRESETS]
    for m in catalog.PRESETS:
        p = PRESETS[m.hub_id.split(":")[1]]
        c = m.config
        assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["intermediate_size"],
                c["vocab_size"]) == (p.hidden_size, p.num_layers, p.num_heads, p.intermediate_size, p.vocab_size)
        assert m.params == count_params(preset_config(p.name))
        assert m.licence_class == "licence-free" and m.download_bytes == 0


@pytest.mark.parametrize("free_gb", [2, 8, 24])
def test_the_fit_marks_are_the_engines_memory_figures_on_the_given_gpu(free_gb):
    card = gpu(free_gb)
    spec = JobSpec(model="picker", data=["-"], out="-")
    for m in catalog.CATALOG:
        marks = catalog.method_figures(m.config, m.params, gpu=card, ram_available=0)
        for method in catalog.METHODS:
            want = preflight.figures(spec, m.config, params_total=m.params, method=method, precision="bf16",
                                     device="cuda:0", available=card.vram_free)
            assert marks[method]["total"] == want["memory"].total
            assert marks[method]["verdict"] == want["verdict"]
            fits = marks[method]["total"] <= preflight.FITS_FRACTION * card.vram_free
            assert (marks[method]["verdict"] == "fits") == fits
    small, big = catalog.CATALOG[0], catalog.CATALOG[2]   # SmolLM2-135M, SmolLM2-1.7B
    if free_gb == 8:
        verdict = {m.hub_id: {k: v["verdict"] for k, v in catalog.method_figures(
            m.config, m.params, gpu=card, ram_available=0).items()} for m in (small, big)}
        assert verdict[small.hub_id]["lora"] == "fits" and verdict[big.hub_id]["full"] == "wont_fit"


def test_without_a_gpu_the_figures_are_for_the_cpu_and_qlora_is_not_offered():
    m = catalog.CATALOG[0]
    marks = catalog.method_figures(m.config, m.params, gpu=None, ram_available=int(12 * GiB))
    assert marks["qlora"]["verdict"] == "unavailable" and "NVIDIA" in marks["qlora"]["why"]
    assert marks["full"]["available"] == int(12 * GiB) and marks["full"]["verdict"] in ("fits", "tight", "wont_fit")
    preset = catalog.PRESETS[0]
    marks = catalog.method_figures(preset.config, preset.params, gpu=gpu(8), ram_available=0, scratch=True)
    assert marks["lora"]["verdict"] == marks["qlora"]["verdict"] == "unavailable" and marks["full"]["verdict"] == "fits"


def test_a_longer_sequence_in_the_form_raises_the_figures():
    m = catalog.CATALOG[3]
    short = catalog.method_figures(m.config, m.params, gpu=gpu(8), ram_available=0)
    spec = JobSpec(model="picker", data=["-"], out="-", seq_len=2048, gradient_checkpointing=False)
    long = catalog.method_figures(m.config, m.params, gpu=gpu(8), ram_available=0, spec=spec)
    assert long["lora"]["total"] > short["lora"]["total"]


# ---- the dialog -----------------------------------------------------------------------------------
def test_the_picker_marks_what_fits_on_the_detected_gpu(qtbot):
    card = gpu(8)
    picker = ModelPicker(report=report(card))
    qtbot.addWidget(picker)
    assert "Test GPU" in picker.gpu_label.text() and "8.0 GB free" in picker.gpu_label.text()
    assert picker.table.rowCount() == len(catalog.CATALOG) + len(catalog.PRESETS)
    for row, m in enumerate((*catalog.CATALOG, *catalog.PRESETS)):
        assert picker.table.item(row, 0).data(HUB_ID_ROLE) == m.hub_id
        marks = catalog.method_figures(m.config, m.params, gpu=card, ram_available=0, scratch=m.is_scratch)
        for method, col in METHOD_COLUMN.items():
            item = picker.table.item(row, col)
            assert item.data(VERDICT_ROLE) == marks[method]["verdict"]
            if marks[method]["verdict"] == "fits":
                assert item.text().endswith("✓") and preflight.format_bytes(marks[method]["total"]) in item.text()
            elif marks[method]["verdict"] == "wont_fit":
                assert item.text().endswith("✗")
    cpu = ModelPicker(report=report(None))
    qtbot.addWidget(cpu)
    assert "No NVIDIA GPU" in cpu.gpu_label.text()
    assert cpu.table.item(0, METHOD_COLUMN["qlora"]).text() == "—"


def test_choosing_in_the_picker_fills_the_forms_model(qtbot, store):
    view = NewFinetuneView(store, None)
    qtbot.addWidget(view)
    picker = view.open_picker()
    picker.select("Qwen/Qwen2.5-0.5B")
    assert picker.use_btn.isEnabled() and picker.download_btn.isEnabled()
    with qtbot.waitSignal(picker.chosen):
        picker.use_btn.click()
    assert view.model_id() == "Qwen/Qwen2.5-0.5B" and view.model_combo.currentData() == HUB
    assert view.method_combo.currentData() == "lora"
    picker = view.open_picker()
    picker.select("scratch:small")
    assert not picker.download_btn.isEnabled()   # nothing to download for a new model
    picker.use_btn.click()
    assert view.model_id() == "scratch:small" and view.method_combo.currentData() == "full"
    picker = view.open_picker()
    picker.hub_edit.setText("../../etc/passwd")
    picker.hub_btn.click()
    assert "is not a hub model id" in picker.status.text() and view.model_id() == "scratch:small"
    picker.hub_edit.setText("someone/their-model")
    picker.hub_btn.click()
    assert view.model_id() == "someone/their-model"


def model_folder(path, *, weights=True, tokenizer=True, config=True):
    path.mkdir(parents=True)
    if config:
        (path / "config.json").write_text(json.dumps(CONFIG))
    if weights:
        (path / "model.safetensors").write_bytes(safetensors_bytes(16))
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return path


def test_a_local_folder_is_checked_plainly_before_it_fills_the_form(qtbot, store, tmp_path):
    view = NewFinetuneView(store, None)
    qtbot.addWidget(view)
    picker = view.open_picker()
    pickled = model_folder(tmp_path / "pickled", weights=False)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    bad_config = model_folder(tmp_path / "badcfg", config=False)
    (bad_config / "config.json").write_text("[1, 2")
    cases = {tmp_path / "missing": "no such folder",
             model_folder(tmp_path / "noconfig", config=False): "has no config.json",
             bad_config: "cannot be read as JSON",
             pickled: "has only pickled weights (pytorch_model.bin)",
             model_folder(tmp_path / "noweights", weights=False): "has no model weights",
             model_folder(tmp_path / "notok", tokenizer=False): "has no tokenizer files"}
    for folder, words in cases.items():
        assert not picker.use_folder(str(folder))
        text = picker.status.text()
        assert text.startswith(str(folder)) and words in text and "\n" not in text, text
    assert not view.model_edit.text()
    good = model_folder(tmp_path / "good")
    assert picker.use_folder(str(good))
    assert view.model_combo.currentData() == LOCAL and view.model_id() == str(good)


# ---- downloading from the picker (a fake hub, the real engine command) -----------------------------
@pytest.fixture
def hub(monkeypatch):
    h = FakeHub(tiny_repo(weights_bytes=1 << 20))
    monkeypatch.setenv("HF_ENDPOINT", h.url)     # the engine process inherits these
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    yield h
    h.close()


def test_the_picker_downloads_with_progress_and_fills_the_downloaded_folder(qtbot, store, hub):
    hub.delay = 0.02   # about 0.6 s for the weights: a few progress events with a speed
    view = NewFinetuneView(store, None)
    qtbot.addWidget(view)
    picker = view.open_picker()
    picker.hub_edit.setText(REPO)
    seen = []
    with qtbot.waitSignal(picker.chosen, timeout=60_000) as got:
        picker.start_download()
        assert picker.cancel_btn.isVisibleTo(picker) and not picker.download_btn.isEnabled()
        picker.download.progress.connect(lambda _ev: seen.append(picker.status.text()))
    folder = got.args[0]
    assert folder.endswith(f"{REPO.replace('/', '--')}/{SHA[:12]}")
    assert view.model_combo.currentData() == LOCAL and view.model_id() == folder
    assert any(s.startswith(f"Downloading {REPO}: ") and " of " in s and "/s" in s for s in seen), seen


def test_cancel_stops_the_download_and_keeps_what_came(qtbot, store, hub, tmp_path):
    hub.delay = 0.1   # ~330 KB/s: several seconds for the weights
    picker = ModelPicker(store, report=report(None))
    qtbot.addWidget(picker)
    picker.hub_edit.setText(REPO)
    chosen = []
    picker.chosen.connect(chosen.append)
    picker.start_download()
    qtbot.waitUntil(lambda: "model.safetensors" in str(hub.requests[-1:]) and hub.requests[-1]["sent"] > 0,
                    timeout=30_000)
    picker.cancel_btn.click()
    qtbot.waitUntil(lambda: not picker.download.running(), timeout=10_000)
    assert "Stopped" in picker.status.text() and "download again" in picker.status.text()
    assert not chosen and picker.download_btn.isEnabled() and not picker.cancel_btn.isVisibleTo(picker)


# ---- searching the hub (`modron-train models search`, and from the picker) --------------------------
def test_search_answers_checked_results_and_offline_is_one_line(hub):
    import subprocess
    import sys

    from tests.hub_helpers import ROOT, env_for
    from training_core.protocol import decode_answer
    run = subprocess.run([sys.executable, "-m", "training_core.cli", "models", "search", "tiny", "--json"],
                         env=env_for(hub.url), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    models = decode_answer(run.stdout)["models"]
    assert [m["id"] for m in models] == [REPO, "tiny-org/tiny-gated", "tiny-org/odd-licence"]   # no path
    assert models[0]["licence_class"] == "permissive" and not models[0]["gated"]
    assert models[1]["downloads"] == 10 ** 12 and models[1]["likes"] == 0 and models[1]["gated"]
    assert models[1]["licence_class"] == "use-restricted"
    assert models[2]["licence_id"] is None and models[2]["licence_class"] == "unknown"
    offline = subprocess.run([sys.executable, "-m", "training_core.cli", "models", "search", "tiny"],
                             env=env_for("http://127.0.0.1:9"), cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = offline.stderr.strip().splitlines()
    assert offline.returncode == 2 and len(lines) == 1 and "cannot reach the Hugging Face hub" in lines[0]


def test_the_picker_searches_the_hub_and_a_result_can_be_chosen(qtbot, hub):
    picker = ModelPicker(report=report(gpu(8)))
    qtbot.addWidget(picker)
    before = picker.table.rowCount()
    picker.hub_edit.setText("tiny")
    picker.search_btn.click()
    qtbot.waitUntil(lambda: picker.table.rowCount() == before + 3, timeout=30_000)
    assert "3 models" in picker.status.text()
    row = before
    assert picker.table.item(row, 0).data(HUB_ID_ROLE) == REPO
    assert picker.table.item(row, METHOD_COLUMN["lora"]).text() == "?"   # no config yet: Check reads it
    picker.hub_edit.setText("tiny-gated")
    picker.search_btn.click()
    qtbot.waitUntil(lambda: picker.table.rowCount() == before + 1, timeout=30_000)   # the old results go
    picker.select("tiny-org/tiny-gated")
    with qtbot.waitSignal(picker.chosen) as got:
        picker.use_btn.click()
    assert got.args == ["tiny-org/tiny-gated"]
