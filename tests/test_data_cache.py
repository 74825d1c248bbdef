"""Tokenization into the token cache: contents, reuse, atomic writes, dtypes."""
import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from training_core import paths
from training_core.data import build_dataset, tokenizer_fingerprint, validate
from training_core.data import cache as cache_mod
from training_core.data import formats

from helpers import SAMPLE_TEXT, make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def expected_tokens(tokenizer, texts):
    out = []
    for t in texts:
        out += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return out


def all_tokens(ds):
    arrays = ds._arrays
    return np.concatenate([np.asarray(a) for a in arrays]).tolist()


def make_data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.txt").write_text(SAMPLE_TEXT)
    (d / "b.jsonl").write_text("".join(json.dumps({"text": f"the sea number {i}"}) + "\n" for i in range(20)))
    return d


def count_encodes(monkeypatch):
    calls = []
    real = cache_mod.make_encoder

    def counting(tokenizer):
        encode = real(tokenizer)

        def wrapped(texts):
            calls.append(len(texts))
            return encode(texts)
        return wrapped
    monkeypatch.setattr(cache_mod, "make_encoder", counting)
    return calls


def test_tokens_are_records_each_followed_by_eos(tmp_path, tok):
    d = make_data(tmp_path)
    ds = build_dataset([d], tok, seq_len=16, cache_dir=tmp_path / "c")
    texts = [SAMPLE_TEXT] + [f"the sea number {i}" for i in range(20)]
    assert all_tokens(ds) == expected_tokens(tok, texts)
    assert ds.tokens_total == len(expected_tokens(tok, texts))


def test_second_build_does_no_tokenization(tmp_path, tok, monkeypatch):
    d = make_data(tmp_path)
    calls = count_encodes(monkeypatch)
    first = build_dataset([d], tok, seq_len=16)
    assert calls, "the first build should tokenize"
    n = len(calls)
    second = build_dataset([d], tok, seq_len=16)
    assert len(calls) == n, "the second build tokenized again"
    assert second.fingerprint == first.fingerprint
    assert np.array_equal(second.train_batch(range(second.num_train)), first.train_batch(range(first.num_train)))
    # The default cache lives under paths.cache_dir() / "tokens".
    assert sorted(p.suffix for p in (paths.cache_dir() / "tokens").iterdir()) == [".bin", ".bin", ".ends", ".ends",
                                                                                ".json", ".json"]
    # validate() with the same tokenizer reuses the cache too.
    report = validate([d], tokenizer=tok)
    assert len(calls) == n and report.tokens == first.tokens_total


def test_changes_invalidate_the_cache(tmp_path, tok, monkeypatch):
    d = make_data(tmp_path)
    calls = count_encodes(monkeypatch)
    first = build_dataset([d], tok, seq_len=16)
    n = len(calls)
    (d / "b.jsonl").write_text(json.dumps({"text": "a new record"}) + "\n")
    second = build_dataset([d], tok, seq_len=16)
    assert len(calls) == n + 1  # only the edited file was tokenized again
    assert second.fingerprint != first.fingerprint
    other = make_tokenizer(vocab_size=280)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
    build_dataset([d], other, seq_len=16)
    assert len(calls) > n + 1


def test_killed_tokenization_leaves_no_cache(tmp_path, tok, monkeypatch):
    d = make_data(tmp_path)
    folder = tmp_path / "cache"
    real = cache_mod.make_encoder
    state = {"n": 0}

    def dying(tokenizer):
        encode = real(tokenizer)

        def wrapped(texts):
            state["n"] += 1
            if state["n"] == 2:
                raise KeyboardInterrupt  # as if the run were stopped mid-file
            return encode(texts)
        return wrapped
    monkeypatch.setattr(cache_mod, "make_encoder", dying)
    monkeypatch.setattr(cache_mod, "BATCH_RECORDS", 5)
    with pytest.raises(KeyboardInterrupt):
        build_dataset([d / "b.jsonl"], tok, seq_len=8, cache_dir=folder)
    assert list(folder.iterdir()) == []  # no partial .bin, no temp file, no .json
    monkeypatch.setattr(cache_mod, "make_encoder", real)
    ds = build_dataset([d / "b.jsonl"], tok, seq_len=8, cache_dir=folder)
    assert all_tokens(ds) == expected_tokens(tok, [f"the sea number {i}" for i in range(20)])


def test_damaged_cache_entry_is_rebuilt(tmp_path, tok):
    d = make_data(tmp_path)
    folder = tmp_path / "cache"
    first = build_dataset([d], tok, seq_len=16, cache_dir=folder)
    want = all_tokens(first)
    del first
    for b in folder.glob("*.bin"):
        b.write_bytes(b.read_bytes()[:10])  # cut short, e.g. by a full disk
    ds = build_dataset([d], tok, seq_len=16, cache_dir=folder)
    assert all_tokens(ds) == want
    want_positions = ds.train_positions(range(ds.num_train)).tolist()
    del ds
    for e in folder.glob("*.ends"):
        e.unlink()   # as an entry of an older Modron would lack it
    ds = build_dataset([d], tok, seq_len=16, cache_dir=folder)
    assert all_tokens(ds) == want and ds.train_positions(range(ds.num_train)).tolist() == want_positions
    assert len(list(folder.glob("*.ends"))) == 2


def test_no_special_tokens_and_no_truncation(tmp_path):
    tok = make_tokenizer()
    eos = tok.eos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A <|endoftext|>", special_tokens=[("<|endoftext|>", eos)])
    tok.backend_tokenizer.enable_truncation(max_length=8)
    p = tmp_path / "a.txt"
    p.write_text(SAMPLE_TEXT)
    ds = build_dataset([p], tok, seq_len=8, cache_dir=tmp_path / "c")
    toks = all_tokens(ds)
    assert toks.count(eos) == 1 and toks[-1] == eos
    assert len(toks) > 100


def test_long_txt_gets_one_eos_and_batches(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(formats, "TXT_PIECE_CHARS", 300)
    monkeypatch.setattr(cache_mod, "BATCH_CHARS", 1000)
    calls = count_encodes(monkeypatch)
    p = tmp_path / "book.txt"
    p.write_text("\n\n".join([SAMPLE_TEXT[:250]] * 40))
    seen = []
    ds = build_dataset([p], tok, seq_len=8, cache_dir=tmp_path / "c", progress=lambda a, b: seen.append((a, b)))
    toks = all_tokens(ds)
    assert len(calls) > 3
    assert toks.count(tok.eos_token_id) == 1 and toks[-1] == tok.eos_token_id
    size = p.stat().st_size
    assert seen[0] == (0, size) and seen[-1] == (size, size)
    assert all(b == size for _, b in seen) and [a for a, _ in seen] == sorted(a for a, _ in seen)
    assert len(seen) > 3


def word_tokenizer(n_words):
    vocab = {f"w{i}": i for i in range(n_words)}
    vocab["<eos>"] = n_words
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


@pytest.mark.parametrize("n_words, dtype", [(1000, np.uint16), (70000, np.uint32)])
def test_token_dtype_follows_vocab_size(tmp_path, n_words, dtype):
    tok = word_tokenizer(n_words)
    p = tmp_path / "a.txt"
    p.write_text(f"w{n_words - 1} w1 w2 w3")
    folder = tmp_path / "c"
    ds = build_dataset([p], tok, seq_len=5, cache_dir=folder)
    (bin_file,) = folder.glob("*.bin")
    assert bin_file.stat().st_size == 5 * np.dtype(dtype).itemsize
    assert ds.train_block(0).tolist() == [n_words - 1, 1, 2, 3, n_words]
    assert ds.train_block(0).dtype == np.int64


def test_one_huge_record_is_tokenized_in_pieces_within_bounded_memory(tmp_path):
    """A single 8 MB JSONL record: tokenized as .txt files are, in pieces (whole, it took ~200 bytes of
    RAM per character in the fast tokenizer: 20 MB peaked at 4.6 GB, 0.3 GB in pieces), as one record."""
    import subprocess
    import sys
    from pathlib import Path
    words = " ".join(f"word{i % 5000}" for i in range(1_000_000))      # ~8 MB
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"text": words}) + "\n", encoding="utf-8")
    # The peak of this child alone: Linux keeps the RSS high-water mark across fork and exec, so a child of a
    # pytest process that has grown to 1 GB started at 1 GB; writing 5 to clear_refs resets it (Linux 4.0+).
    code = ("import sys; sys.path.insert(0, 'tests'); from pathlib import Path;"
            "open('/proc/self/clear_refs', 'w').write('5');"
            "from helpers import make_tokenizer; from training_core.data.cache import cached_or_build;"
            f"e = cached_or_build(Path({str(path)!r}), make_tokenizer(), 'fp', Path({str(tmp_path / 'c')!r}));"
            "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0].split()[1];"
            "print(e.tokens, len(e.ends()), hwm)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    tokens, records, peak_kb = map(int, out.stdout.split())
    assert records == 1 and tokens > 1_000_000
    assert peak_kb < 800_000, f"{peak_kb / 1e6:.1f} GB"
