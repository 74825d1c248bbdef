"""`modron-train generate` and whole-character decoding, on tiny runs written in the checkpoint format."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from generate_helpers import finetuned_run, full_run, lora_run
from training_core import cli
from training_core.generate import Request, load_trained, prompt_ids, resolve, run_one
from training_core.models.tokenizer import bytes_tokenizer
from training_core.whole_chars import CharStream, WholeChars, token_bytes, valid_prefix

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("gen")
    return {"full": full_run(base / "full"), "lora": lora_run(base / "lora")}


@pytest.fixture(scope="module")
def full_model(runs):
    model, tok = load_trained(resolve(runs["full"]), torch.float32)
    return model, tok


def generate(model, tok, stop_after=None, **settings):
    pieces, calls = [], []

    def should_stop():
        calls.append(1)
        return stop_after is not None and len(calls) > stop_after
    out = run_one(model, tok, Request(**{"prompt": "Once upon a time", "seed": 3, **settings}),
                  lambda piece, _n: pieces.append(piece), should_stop, torch.device("cpu"))
    return out, pieces


# ---- whole characters ------------------------------------------------------------------------
def test_char_stream_holds_back_half_a_character():
    tok = bytes_tokenizer()
    stream = CharStream(tok)
    data = "é中🙂".encode("utf-8")
    got = [stream.feed([b]) for b in data]
    assert got == ["", "é", "", "", "中", "", "", "", "🙂"]
    assert stream.feed([tok.eos_token_id]) == ""          # special tokens stand for no text


def test_the_mask_allows_only_what_continues_valid_utf8():
    proc = WholeChars(bytes_tokenizer())
    fresh = proc.allowed(0, None)
    assert fresh[ord("a")] and fresh[0xE4] and not fresh[0x80] and not fresh[0xC0] and not fresh[0xF5]
    assert fresh[bytes_tokenizer().eos_token_id]
    after_e0 = proc.allowed(2, 0xE0)                        # E0 needs A0..BF next (no overlong forms)
    assert after_e0[0xA0] and not after_e0[0x9F] and not after_e0[ord("a")]
    assert not after_e0[bytes_tokenizer().eos_token_id]     # no eos in the middle of a character
    assert not proc.allowed(1, None)[0xE4]
    assert valid_prefix("中".encode()[:2]) and not valid_prefix(b"\xed\xa0") and not valid_prefix(b"\xf4\x90")


def test_sentencepiece_byte_fallback_tokens_are_their_bytes():
    """Llama-2/Mistral-style vocabularies: "▁" is a space, <0xE4> is one byte."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)},
             "▁the": 259, "中": 260}
    sp = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    table = token_bytes(tok)
    assert table[3 + 0xE4] == b"\xe4" and table[259] == b" the" and table[260] == "中".encode()
    assert table[2] is None
    mask = WholeChars(tok).allowed(0, None)
    assert mask[259] and mask[260] and mask[3 + 0xE4] and not mask[3 + 0x80]
    assert CharStream(tok).feed([259, 3 + 0xE4, 3 + 0xB8]) == " the"


def test_a_random_byte_model_never_writes_invalid_utf8(full_model):
    model, tok = full_model
    table = token_bytes(tok)
    # Without the mask this model writes stray bytes: the test can tell.
    torch.manual_seed(0)
    ids = model.generate(input_ids=torch.tensor([[ord("O")]]), max_new_tokens=60, do_sample=True, top_k=0,
                         pad_token_id=tok.pad_token_id)[0, 1:].tolist()
    assert not valid_prefix(b"".join(table[i] or b"" for i in ids))
    for seed in range(3):
        out, pieces = generate(model, tok, temperature=1.5, top_k=0, top_p=1.0, repetition_penalty=1.0,
                               max_new_tokens=80, seed=seed)
        assert "".join(pieces) == out["text"] and "\ufffd" not in out["text"]
        assert all(piece for piece in pieces)
        out["text"].encode("utf-8")                           # no lone surrogates either
        assert out["tokens"] <= 80


# ---- samplers ---------------------------------------------------------------------------------
def test_greedy_is_deterministic_and_max_tokens_is_kept(full_model):
    model, tok = full_model
    one, _ = generate(model, tok, temperature=0, max_new_tokens=24, seed=1)
    two, _ = generate(model, tok, temperature=0, max_new_tokens=24, seed=2)
    assert one["text"] == two["text"] and one["tokens"] == two["tokens"]
    assert one["tokens"] <= 24 and one["reason"] in ("length", "eos")
    if one["reason"] == "length":
        assert one["tokens"] == 24


def test_a_stop_sequence_ends_the_text_before_it(full_model):
    model, tok = full_model
    full, _ = generate(model, tok, temperature=0, max_new_tokens=40, repetition_penalty=1.3)
    text = full["text"]
    assert len(text) >= 6, text
    stop = text[3:5]
    cut, pieces = generate(model, tok, temperature=0, max_new_tokens=40, repetition_penalty=1.3, stop=(stop,))
    assert cut["reason"] == "stop_sequence" and cut["text"] == text[:text.index(stop)]
    assert "".join(pieces) == cut["text"]                      # the held-back start of the stop never came out


def test_a_stop_ends_generation_between_tokens(full_model):
    model, tok = full_model
    out, _ = generate(model, tok, stop_after=3, max_new_tokens=500, temperature=1.0)
    assert out["reason"] == "stopped" and out["tokens"] <= 4


# ---- modes and sources -------------------------------------------------------------------------
def test_chat_mode_uses_the_chat_template_or_a_plain_fallback(runs):
    from training_core.models.tokenizer import load_tokenizer
    tok = load_tokenizer(resolve(runs["lora"]).ckpt / "tokenizer")
    ids, stops, _ = prompt_ids(tok, Request(prompt="hi there", mode="chat", system="be kind"))
    text = tok.decode(ids)
    assert "<|system|>be kind" in text and "<|user|>hi there" in text and text.endswith("<|assistant|>")
    assert stops == ()
    plain = bytes_tokenizer()
    ids, stops, _ = prompt_ids(plain, Request(prompt="hi there", mode="chat", stop=("END",)))
    assert plain.decode(ids).endswith("### User:\nhi there\n\n### Assistant:\n")   # as training renders chats
    assert stops == ("END", "\n\n### User:")
    story, _, _ = prompt_ids(plain, Request(prompt="hi there"))
    assert plain.decode(story) == "hi there"


def test_a_chat_goes_on_from_its_history_and_drops_the_oldest_exchanges_that_no_longer_fit(runs):
    from training_core.models.tokenizer import load_tokenizer
    tok = load_tokenizer(resolve(runs["lora"]).ckpt / "tokenizer")
    history = (("hello", "hi, how can I help?"), ("tell me a story", "Once upon a time..."))
    req = Request(prompt="another one", mode="chat", system="be kind", history=history, max_new_tokens=10)
    ids, _, dropped = prompt_ids(tok, req)
    text = tok.decode(ids)
    order = ["<|system|>be kind", "<|user|>hello", "<|assistant|>hi, how can I help?", "<|user|>tell me a story",
             "<|assistant|>Once upon a time...", "<|user|>another one"]
    assert [text.index(part) for part in order] == sorted(text.index(part) for part in order) and dropped == 0
    newest_only, _, _ = prompt_ids(tok, dataclasses.replace(req, history=()))
    one_kept, _, _ = prompt_ids(tok, dataclasses.replace(req, history=history[1:]))
    ids, _, dropped = prompt_ids(tok, req, context=len(one_kept) + 10)      # room for the newest exchange only
    assert dropped == 1 and ids == one_kept
    ids, _, dropped = prompt_ids(tok, req, context=len(newest_only) + 9)    # not even that: the message alone
    assert dropped == 2 and ids == newest_only
    plain = bytes_tokenizer()
    ids, stops, _ = prompt_ids(plain, dataclasses.replace(req, system=""))
    assert plain.decode(ids) == ("### User:\nhello\n\n### Assistant:\nhi, how can I help?\n\n### User:\ntell me a "
                                 "story\n\n### Assistant:\nOnce upon a time...\n\n### User:\nanother one\n\n"
                                 "### Assistant:\n")


@pytest.mark.parametrize("content, problem", [
    ("[{\"role\": \"user\", \"content\": \"hi\"}]", "must end with the assistant's reply"),
    ("[{\"role\": \"assistant\", \"content\": \"hi\"}]", "message 1 must be"),
    ("[{\"role\": \"user\", \"content\": 3}, {\"role\": \"assistant\", \"content\": \"x\"}]",
     "message 1 must be"),
    ("{\"role\": \"user\"}", "must be a JSON list"),
    ("[" * 100_000 + "]" * 100_000, "cannot be read as a JSON chat history"),
    ("[{\"role\": \"user\", \"content\": \"" + "x" * 2_000_001 + "\"}, {\"role\": \"assistant\", "
     "\"content\": \"\"}]", "more than 2,000,000 characters"),
    ("not json", "cannot be read as a JSON chat history"),
])
def test_a_bad_history_file_is_one_plain_line_exit_2(runs, tmp_path, capsys, content, problem):
    path = tmp_path / "history.json"
    path.write_text(content, encoding="utf-8")
    assert cli.main(["generate", str(runs["full"]), "--mode", "chat", "--prompt", "x", "--history", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0] and str(path) in err[0], err


def test_a_history_answers_what_it_left_out(runs, full_model, tmp_path, capsys):
    """The model's 512 positions hold the newest exchange but not the 500-byte one: the answer says so."""
    path = tmp_path / "history.json"
    path.write_text(json.dumps([{"role": "user", "content": "a" * 500}, {"role": "assistant", "content": "ok"},
                                {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hey"}]))
    assert cli.main(["generate", str(runs["full"]), "--prompt", "x", "--history", str(path)]) == 2
    assert "--history: is for chat mode" in capsys.readouterr().err
    from training_core.generate import read_history
    model, tok = full_model
    out = run_one(model, tok, Request(prompt="and now?", mode="chat", history=read_history(str(path)), temperature=0,
                                      max_new_tokens=4), lambda *_: None, lambda: False, torch.device("cpu"))
    assert out["history_dropped"] == 1


def test_a_chat_template_that_fails_is_one_plain_line_exit_2(tmp_path, capsys):
    tok = bytes_tokenizer()
    tok.chat_template = "{{ raise_exception('this template says no') }}"
    run = full_run(tmp_path / "run", tokenizer=tok)
    assert cli.main(["generate", str(run), "--mode", "chat", "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this template says no" in err[0] and "--mode chat" in err[0], err


def test_a_lora_checkpoint_loads_base_plus_adapter(runs):
    from peft import PeftModel
    source = resolve(runs["lora"])
    assert source.kind == "lora" and source.ckpt.name == "ckpt-00000012"
    model, tok = load_trained(source, torch.float32)
    assert isinstance(model, PeftModel)
    trained, _ = generate(model, tok, temperature=0, max_new_tokens=12, repetition_penalty=1.0)
    with model.disable_adapter():
        base, _ = generate(model, tok, temperature=0, max_new_tokens=12, repetition_penalty=1.0)
    assert trained["tokens"] and trained["text"] != base["text"]


@pytest.mark.parametrize("make, problem", [
    (lambda p: p, "no such run, checkpoint or model folder"),
    (lambda p: (p.mkdir(), (p / "job.json").write_text("{}"), p)[-1], "has no usable checkpoint yet"),
    (lambda p: (p.mkdir(), p)[-1], "is not a Modron run, checkpoint or model folder"),
])
def test_a_bad_source_is_one_plain_line_exit_2(tmp_path, capsys, make, problem):
    folder = make(tmp_path / "run")
    assert cli.main(["generate", str(folder), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0] and str(folder) in err[0], err


def test_compare_base_of_a_full_finetune_and_an_exported_folder(runs, tmp_path, capsys):
    """Text mode (a terminal): each stream under its name; the base model is loaded from the run's job,
    or from --base for an exported folder, which alone has no base to compare with."""
    run = finetuned_run(tmp_path / "ft")
    settings = ["--prompt", "Once", "--temperature", "0", "--max-new-tokens", "6", "--repetition-penalty", "1"]
    assert cli.main(["generate", str(run), "--compare-base", *settings]) == 0
    out = capsys.readouterr().out
    assert out.startswith("--- trained ---\n") and "\n--- base ---\n" in out
    trained, base = out[len("--- trained ---\n"):].split("\n--- base ---\n")
    assert trained != base
    exported = tmp_path / "ft-base"   # a plain model folder, as an export writes one
    assert resolve(exported).kind == "model"
    assert cli.main(["generate", str(exported), "--compare-base", *settings]) == 2
    assert "--base" in capsys.readouterr().err
    assert cli.main(["generate", str(exported), "--compare-base", "--base", str(exported), *settings]) == 0
    _, plain = capsys.readouterr().out.split("--- trained ---\n")
    assert plain.split("\n--- base ---\n")[0] == base.removesuffix("\n")   # the base model, either way


def test_bad_settings_are_refused(tmp_path, capsys, runs):
    assert cli.main(["generate", str(runs["full"]), "--prompt", "x", "--top-p", "0"]) == 2
    assert "--top-p" in capsys.readouterr().err
    assert cli.main(["generate", str(runs["full"]), "--prompt", "x", "--compare-base"]) == 2
    assert "trained from scratch" in capsys.readouterr().err
    assert cli.main(["generate", str(runs["full"]), "--prompt", "x", "--device", "gpu"]) == 2
    assert "unknown device" in capsys.readouterr().err


# ---- the subprocess, as the app runs it --------------------------------------------------------
def test_json_streams_tokens_and_obeys_stop(runs, tmp_path):
    err = open(tmp_path / "stderr.txt", "w+", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "training_core.cli", "generate", str(runs["lora"]), "--json",
                             "--prompt", "Once", "--max-new-tokens", "5000", "--temperature", "1.0",
                             "--compare-base"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=err, text=True, encoding="utf-8")
    events = []
    try:
        for line in proc.stdout:
            events.append(json.loads(line))
            if sum(e["type"] == "token" for e in events) == 3:
                sent = time.monotonic()
                proc.stdin.write('{"v":1,"type":"stop"}\n')
                proc.stdin.flush()
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    assert time.monotonic() - sent < 5
    assert events[0]["type"] == "phase" and events[-1]["type"] == "result"
    answer = events[-1]["answer"]
    assert answer["stopped"] is True and answer["streams"]["trained"]["reason"] == "stopped"
    assert "base" not in answer["streams"]                     # a stop ends the whole request
    tokens = [e for e in events if e["type"] == "token"]
    assert {e["stream"] for e in tokens} == {"trained"}
    assert "".join(e["text"] for e in tokens) == answer["streams"]["trained"]["text"]
    # transformers' "Loading weights" bar is noise on every call (the app logs stderr): it is off.
    err.seek(0)
    stderr = err.read()
    err.close()
    assert "Loading weights" not in stderr and "it/s]" not in stderr, stderr


def test_training_samples_are_whole_characters_too(full_model):
    """Engine.samples (the run's sample events) masks and decodes like the Playground."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from training_core.engine import Engine
    model, tok = full_model
    sent = []
    for seed in range(4):
        fake = SimpleNamespace(model=model, tokenizer=tok, device=torch.device("cpu"), step=7,
                               spec=SimpleNamespace(seed=seed, sample_prompts=["Once"], sample_max_tokens=40),
                               _autocast=nullcontext, emit=lambda type_, **ev: sent.append(ev))
        Engine._samples(fake)   # samples() is this, eagerly for a compiled run
    assert len(sent) == 4 and all("\ufffd" not in ev["text"] for ev in sent)
    assert any(ord(ch) > 127 for ev in sent for ch in ev["text"])   # multi-byte characters did come


def test_a_stop_while_the_model_loads_ends_the_wait_at_once(runs, monkeypatch):
    """SIGTERM and the `stop` control only set a flag; the load runs in a helper thread, so a stop ends
    the wait in our own code however long the load takes (it used to wait for the first token)."""
    import threading

    from training_core import generate as gen
    from training_core.controls import StopRequested
    monkeypatch.setattr(gen, "load_trained", lambda *a, **k: time.sleep(60))   # a load that never ends in time
    args = cli.build_parser().parse_args(["generate", str(runs["full"]), "--prompt", "Once", "--json"])
    session = gen._Session(json_mode=False)
    threading.Timer(0.3, session.controls.stop).start()
    began = time.monotonic()
    with pytest.raises(StopRequested):
        gen._generate(args, session)
    assert time.monotonic() - began < 3 and session.controls.abandoned is not None


# ---- the command line's own text ---------------------------------------------------------------
def test_stop_reads_the_playgrounds_escapes(runs, capsys):
    r"""`--stop "\n"` is a new line, as in the Playground's field (one function: training_core.escapes)."""
    from training_core.escapes import escape, unescape
    from training_core.generate import request_from
    args = cli.build_parser().parse_args(["generate", str(runs["full"]), "--prompt", "x", "--stop", r"\n",
                                          "--stop", r"\tEND\\n", "--stop", r"C:\path"])
    assert request_from(args).stop == ("\n", "\tEND\\n", "C:\\path")
    for text in ("\nUser:", "a\\nb", "\\", "tab\there", "x\\\\n\n"):
        assert unescape(escape(text)) == text
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    assert r"\n is a new line" in " ".join(capsys.readouterr().out.split())


def test_a_damaged_newest_checkpoint_is_passed_over_with_a_word(tmp_path, capsys):
    """As export does: generating from an older checkpoint than the newest is said (a stderr line in text,
    a `warning` event with --json), else its text passes for the newest model's."""
    run = full_run(tmp_path / "run", step=12)
    full_run(tmp_path / "run", step=20)
    newest = run / "checkpoints" / "ckpt-00000020"
    (newest / "modron_checkpoint.json").write_text(json.dumps(
        {"format": "modron-checkpoint", "version": 1, "step": 20, "kind": "full",
         "files": ["model/model.safetensors"]}), encoding="utf-8")
    weights = newest / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])   # cut short, as by a crash mid-write
    said = "the newest checkpoint ckpt-00000020 is damaged ("
    instead = "generating from ckpt-00000012 (step 12) instead"
    assert resolve(run).warnings[0].startswith(said)
    settings = ["--prompt", "Once", "--temperature", "0", "--max-new-tokens", "3", "--device", "cpu"]
    capsys.readouterr()
    assert cli.main(["generate", str(run), *settings]) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: " + said) and instead in warnings[0], err
    assert "warning" not in out   # stdout is the generated text alone
    proc = subprocess.run([sys.executable, "-m", "training_core.cli", "generate", str(run), "--json", *settings],
                          cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    warned = [e for e in events if e["type"] == "warning"]
    assert len(warned) == 1 and warned[0]["code"] == "damaged_checkpoint", events
    assert warned[0]["message"].startswith(said) and instead in warned[0]["message"]
    assert events[-1]["type"] == "result" and events[-1]["answer"]["checkpoint"].endswith("ckpt-00000012")
