"""Packing into blocks, the held-out split and the per-epoch order."""
import subprocess
import sys

import numpy as np
import pytest

from training_core.data import PackedDataset, build_dataset
from training_core.data.packed import eval_count
from training_core.errors import DataError

from helpers import SAMPLE_TEXT, make_tokenizer


def packed(lengths, seq_len, **kw):
    """Files of consecutive integers, so every token says where it came from."""
    arrays, start = [], 0
    for n in lengths:
        arrays.append(np.arange(start, start + n, dtype=np.uint32))
        start += n
    return PackedDataset(arrays, seq_len, **kw)


def all_blocks(ds):
    return [ds.train_block(i) for i in range(ds.num_train)] + [ds.eval_block(i) for i in range(ds.num_eval)]


def test_blocks_are_contiguous_non_overlapping_and_span_files():
    ds = packed([5, 3, 10, 1, 7], seq_len=4, eval_fraction=0.2)
    assert ds.tokens_total == 26 and ds.num_train + ds.num_eval == 6  # 26 // 4, remainder dropped
    starts = sorted(int(b[0]) for b in all_blocks(ds))
    assert starts == [0, 4, 8, 12, 16, 20]
    for b in all_blocks(ds):
        assert b.dtype == np.int64 and b.tolist() == list(range(b[0], b[0] + 4))


@pytest.mark.parametrize("blocks, fraction, want", [
    (1000, 0.02, 20), (10, 0.02, 1), (2, 0.02, 1), (2, 0.49, 1), (3, 0.49, 1), (1, 0.02, 0),
    (100, 0.0, 0), (100, 0.1, 10),
])
def test_eval_split_sizes(blocks, fraction, want):
    assert eval_count(blocks, fraction) == want
    ds = packed([blocks * 3], seq_len=3, eval_fraction=fraction)
    assert ds.num_eval == want and ds.num_train == blocks - want


def test_eval_split_is_deterministic_and_disjoint():
    a = packed([4000], seq_len=8, eval_fraction=0.05, seed=1)
    b = packed([4000], seq_len=8, eval_fraction=0.05, seed=2)  # another training seed: same eval blocks
    ev_a = [int(a.eval_block(i)[0]) for i in range(a.num_eval)]
    ev_b = [int(b.eval_block(i)[0]) for i in range(b.num_eval)]
    assert ev_a == ev_b and len(ev_a) == 25
    assert ev_a != [i * 8 for i in range(475, 500)]  # spread over the data, not its tail
    train = {int(a.train_block(i)[0]) for i in range(a.num_train)}
    assert not train & set(ev_a) and len(train) + len(ev_a) == 500


def test_epoch_order_is_a_reproducible_permutation():
    ds = packed([10000], seq_len=10, seed=7)
    o0, o1 = ds.epoch_order(0), ds.epoch_order(1)
    assert sorted(o0.tolist()) == list(range(ds.num_train))
    assert not np.array_equal(o0, o1)
    assert np.array_equal(o0, packed([10000], seq_len=10, seed=7).epoch_order(0))
    assert not np.array_equal(o0, packed([10000], seq_len=10, seed=8).epoch_order(0))
    # Another process (as when the engine resumes) computes the same order.
    code = ("import numpy as np; from training_core.data import PackedDataset; "
            "ds = PackedDataset([np.arange(10000, dtype=np.uint16)], 10, seed=7); "
            "print(','.join(map(str, ds.epoch_order(1).tolist())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1])).stdout
    assert out.strip() == ",".join(map(str, o1.tolist()))


def test_train_batch_and_index_errors():
    ds = packed([100], seq_len=10, eval_fraction=0.2)
    batch = ds.train_batch([3, 0, 3])
    assert batch.shape == (3, 10) and batch.dtype == np.int64
    assert np.array_equal(batch[0], ds.train_block(3)) and np.array_equal(batch[1], ds.train_block(0))
    assert ds.train_batch(np.array([1, 2])).shape == (2, 10)
    with pytest.raises(IndexError):
        ds.train_block(ds.num_train)
    with pytest.raises(IndexError):
        ds.eval_block(-1)


def test_too_few_tokens():
    with pytest.raises(DataError) as info:
        packed([3, 4], seq_len=8, where="tiny.txt")
    msg = str(info.value)
    assert msg.startswith("tiny.txt: ") and "only 7 tokens" in msg and "smaller --seq-len" in msg


def test_build_dataset_end_to_end(tmp_path):
    tok = make_tokenizer()
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(SAMPLE_TEXT[i * 100:])
    ds = build_dataset([tmp_path], tok, seq_len=32, eval_fraction=0.1, seed=3, cache_dir=tmp_path / ".cache")
    assert ds.files == [tmp_path / f"{i}.txt" for i in range(3)]  # the hidden cache folder is skipped
    assert ds.seq_len == 32 and ds.num_eval == round((ds.tokens_total // 32) * 0.1)
    joined = np.concatenate([ds.train_block(i) for i in range(ds.num_train)] +
                            [ds.eval_block(i) for i in range(ds.num_eval)])
    assert len(joined) == (ds.tokens_total // 32) * 32
    assert (joined == tok.eos_token_id).sum() <= 3
    assert isinstance(ds.fingerprint, str) and len(ds.fingerprint) >= 8
    again = build_dataset([tmp_path], tok, seq_len=32, eval_fraction=0.1, seed=3, cache_dir=tmp_path / ".cache")
    assert again.fingerprint == ds.fingerprint
    assert build_dataset([tmp_path], tok, seq_len=16, cache_dir=tmp_path / ".cache").fingerprint != ds.fingerprint


# ---- documents inside blocks: position ids, attention, labels ------------------------------

def test_positions_restart_where_records_end_across_files_and_blocks():
    # Two files: records end at 3, 7 and 10 in the first (10 tokens), at 4 and 9 in the second (9 tokens).
    ds = PackedDataset([np.arange(10, dtype=np.uint32), np.arange(9, dtype=np.uint32)], 6, eval_fraction=0.0,
                       ends=[np.array([3, 7, 10]), np.array([4, 9])])
    assert ds.num_train == 3
    got = ds.train_positions([0, 1, 2]).tolist()
    assert got == [[0, 1, 2, 0, 1, 2],      # tokens 0-5: a record ends after token 2
                   [0, 0, 1, 2, 0, 1],      # 6-11: a block starts at 0; a record ends after 6, the file after 9
                   [0, 1, 0, 1, 2, 3]]      # 12-17: the second file's first record ends after 13
    assert ds.train_positions([2, 0]).tolist() == [got[2], got[0]]
    # Without record ends nothing is known: 0..seq_len-1 in every block, as before.
    plain = PackedDataset([np.arange(19, dtype=np.uint32)], 6, eval_fraction=0.0)
    assert plain.train_positions([0, 2]).tolist() == [list(range(6))] * 2


def test_positions_restart_after_each_records_eos_and_not_at_an_eos_inside_a_record(tmp_path):
    import json
    tok = make_tokenizer()
    eos = tok.eos_token_id
    # A chat template that ends every turn with the eos token, as Qwen's (<|im_end|>) and Mistral's (</s>) do:
    # a conversation must not be cut there, only where the cache appended its own eos after the record.
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n"
                         "{% endfor %}")
    rng = np.random.default_rng(0)
    records = []
    for i in range(40):
        words = " ".join(rng.choice(["lighthouse", "ship", "night", "sea", "book"], size=rng.integers(1, 12)))
        records.append([{"role": "user", "content": f"question {i} {words}"},
                        {"role": "assistant", "content": f"answer {words}"}])
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in records))
    ds = build_dataset([tmp_path / "chat.jsonl"], tok, seq_len=48, eval_fraction=0.0, cache_dir=tmp_path / "c")
    ids = ds.train_batch(range(ds.num_train)).reshape(-1)       # the blocks in order: the whole stream
    pos = ds.train_positions(range(ds.num_train))
    # Where each record ends in the stream: its own tokens (two eos from the template) plus the cache's eos.
    lengths = [len(tok(tok.apply_chat_template(m, tokenize=False), add_special_tokens=False)["input_ids"]) + 1
               for m in records]
    record_starts = set(np.cumsum(lengths).tolist())
    want = np.zeros_like(pos)
    for row in range(pos.shape[0]):
        p = 0
        for t in range(ds.seq_len):
            p = 0 if t == 0 or row * ds.seq_len + t in record_starts else p + 1
            want[row, t] = p
    assert pos.tolist() == want.tolist()
    restarts = int((pos[:, 1:] == 0).sum())
    assert restarts >= 10 and (ids == eos).sum() >= 3 * restarts   # most eos tokens did not restart positions
    rows, cols = np.nonzero(pos[:, 1:] == 0)
    assert (ids[rows * ds.seq_len + cols] == eos).all()   # the token before a document's first is an eos


def _tiny_model(vocab: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    assert model.config._attn_implementation == "sdpa"
    return model


def _three_documents():
    """A block of 40 tokens: the end of one document, a whole second one, the start of a third."""
    rng = np.random.default_rng(1)
    eos = 1
    a = np.r_[rng.integers(2, 100, 9), eos]           # positions 0..9
    b = np.r_[rng.integers(2, 100, 17), eos]          # 10..27
    c = rng.integers(2, 100, 12)                       # 28..39
    ids = np.r_[a, b, c]
    ds = PackedDataset([ids.astype(np.uint32)], 40, eval_fraction=0.0, ends=[np.array([10, 28, 40])])
    return ds, a, b, c


def test_a_token_in_the_second_document_sees_only_its_own_document():
    import torch
    from training_core.data.packed import has_documents, packed_inputs
    ds, a, b, c = _three_documents()
    ids = torch.from_numpy(ds.train_batch([0]))
    pos_np = ds.train_positions([0])
    assert has_documents(pos_np) and pos_np[0, 10] == 0 and pos_np[0, 28] == 0 and pos_np[0, 27] == 17
    model = _tiny_model(100)
    with torch.no_grad():
        packed = model(**{k: v for k, v in packed_inputs(ids, torch.from_numpy(pos_np)).items()
                          if k != "labels"}).logits[0]
        alone = model(input_ids=torch.from_numpy(b)[None]).logits[0]
        crossing = model(input_ids=ids).logits[0]      # what training did before: attention across documents
    torch.testing.assert_close(packed[10:28], alone, rtol=1e-4, atol=1e-5)
    # The check can fail: without the position ids the second document attends to the first.
    assert (crossing[10:28] - alone).abs().max() > 1e-2


def test_packed_loss_is_the_loss_of_the_documents_run_alone():
    import torch
    import torch.nn.functional as F
    from training_core.data.packed import IGNORE_INDEX, packed_inputs
    ds, a, b, c = _three_documents()
    ids = torch.from_numpy(ds.train_batch([0]))
    inputs = packed_inputs(ids, torch.from_numpy(ds.train_positions([0])))
    # The first token of each document is no target: it would be predicted from the previous document's eos.
    assert inputs["labels"][0, [0, 10, 28]].tolist() == [IGNORE_INDEX] * 3
    assert inputs["labels"][0, 9] == 1 and inputs["labels"][0, 27] == 1   # the eos stays a target
    model = _tiny_model(100)
    with torch.no_grad():
        loss = model(**inputs).loss
        parts = []
        for doc in (a, b, c):
            x = torch.from_numpy(doc)[None]
            logits = model(input_ids=x).logits[0, :-1]
            parts.append(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
    assert torch.isclose(loss, sum(parts) / (40 - 3), rtol=1e-5), (loss, sum(parts) / 37)


def test_a_block_without_document_starts_gives_the_same_loss_as_before():
    import torch
    from training_core.data.packed import has_documents, packed_inputs
    rng = np.random.default_rng(2)
    ids_np = rng.integers(2, 100, 64)
    # The block's records end outside it: it starts a record's middle and ends before the next.
    ds = PackedDataset([ids_np.astype(np.uint32)], 32, eval_fraction=0.0, ends=[np.array([5, 64])])
    pos = ds.train_positions([1])
    assert pos.tolist() == [list(range(32))] and not has_documents(pos)
    ids = torch.from_numpy(ds.train_batch([1]))
    model = _tiny_model(100)
    with torch.no_grad():
        before = model(input_ids=ids, labels=ids).loss
        assert packed_inputs(ids, None).keys() == {"input_ids", "labels"}
        same = model(**packed_inputs(ids, None)).loss
        with_positions = model(**packed_inputs(ids, torch.from_numpy(pos))).loss
    assert same.item() == before.item()
    assert torch.isclose(with_positions, before, rtol=1e-6)


def test_engine_trains_and_evaluates_with_document_position_ids(tmp_path, monkeypatch):
    """The engine's loop (local runs and swarm peers alike) gives the model position ids that restart
    at every record of a chat JSONL file, in training and in eval, on sdpa attention."""
    import json
    import torch
    from training_core.config import JobSpec
    from training_core.engine import Engine
    from helpers import engine_job
    rng = np.random.default_rng(3)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": "tell me about the sea " * int(rng.integers(1, 6))},
        {"role": "assistant", "content": "the sea is wide " * int(rng.integers(1, 10))}]}) + "\n"
        for _ in range(200)))
    spec = JobSpec(**engine_job(tmp_path, data=[str(data)], steps=2, eval_fraction=0.1))
    eng = Engine(spec, lambda e: None)
    eng._setup()
    eng._t0, eng._paused_total = 0.0, 0.0
    assert eng.model.config._attn_implementation == "sdpa"
    seen = []
    forward = eng.model.forward

    def spy(*args, **kw):
        seen.append(kw)
        return forward(*args, **kw)
    monkeypatch.setattr(eng.model, "forward", spy)
    loss = eng.train_step()
    assert torch.isfinite(loss)
    eng.evaluate()
    assert len(seen) >= 2
    for kw in seen:
        pos, ids, labels = kw["position_ids"], kw["input_ids"], kw["labels"]
        assert pos.shape == ids.shape and (pos[:, 1:] == 0).any()
        eos = eng.tokenizer.eos_token_id
        starts = pos[:, 1:] == 0
        assert (ids[:, :-1][starts] == eos).all()
        assert (labels[pos == 0] == -100).all() and (labels[pos != 0] == ids[pos != 0]).all()
