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
