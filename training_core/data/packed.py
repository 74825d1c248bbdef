"""Packing: every file's cached tokens, virtually concatenated and cut into fixed-size blocks.

A block holds the ends and starts of several records (documents). Each comes with position ids
that restart at 0 where a record starts (after the eos the cache appended to the one before; a
file's first token and a block's first token start at 0 too). Given those position ids and no
attention mask, transformers' sdpa/eager attention builds a block-diagonal causal mask
(masking_utils.find_packed_sequence_indices), so no token attends to another document, and
`packed_labels` leaves out the one target that would cross a boundary.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import DataError, raise_data_errors
from .cache import PIPELINE_VERSION, Entry, cached_or_build, default_cache_dir, tokenizer_fingerprint
from .discover import discover_files

IGNORE_INDEX = -100   # transformers' loss leaves out labels with this value

# The held-out split uses its own fixed seed: runs with different --seed values are then
# evaluated on the same blocks and their eval losses compare.
EVAL_SPLIT_SEED = 20240917


def eval_count(num_blocks: int, eval_fraction: float) -> int:
    """At least one eval block when there are two or more and a fraction is asked for; never all."""
    if eval_fraction <= 0 or num_blocks < 2:
        return 0
    return min(num_blocks - 1, max(1, round(num_blocks * eval_fraction)))


class PackedDataset:
    """Blocks of `seq_len` tokens over memory-mapped token files; nothing is copied into RAM
    until a block is asked for."""

    def __init__(self, arrays: Sequence[np.ndarray], seq_len: int, eval_fraction: float = 0.02, seed: int = 0,
                 files: list[Path] | None = None, fingerprint: str = "", warnings: list[str] | None = None,
                 where: str = "data", ends: Sequence[np.ndarray] | None = None):
        """`ends`: per array, where each of its records ends (exclusive, ascending; Entry.ends()). Without
        them no document boundary is known and position ids are 0..seq_len-1 in every block."""
        self.seq_len = int(seq_len)
        self._ends = list(ends) if ends is not None else None
        if self._ends is not None and len(self._ends) != len(arrays):
            raise ValueError("one array of record ends per token array")
        self.seed = int(seed)
        self.files = list(files or [])
        self.warnings = list(warnings or [])
        self.fingerprint = fingerprint
        self._arrays = list(arrays)
        self._offsets = np.zeros(len(self._arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in self._arrays], out=self._offsets[1:])
        self.tokens_total = int(self._offsets[-1])
        self.num_blocks = self.tokens_total // self.seq_len
        if self.num_blocks < 1:
            raise DataError(where, f"has only {self.tokens_total} tokens, fewer than one block of "
                                   f"--seq-len {self.seq_len}; use a smaller --seq-len (at most "
                                   f"{max(1, self.tokens_total)}) or add more data")
        n_eval = eval_count(self.num_blocks, eval_fraction)
        index_type = np.int32 if self.num_blocks < 2**31 else np.int64
        perm = np.random.default_rng(EVAL_SPLIT_SEED).permutation(self.num_blocks).astype(index_type)
        self._eval = np.sort(perm[:n_eval])
        self._train = np.sort(perm[n_eval:])
        del perm
        self.num_train = len(self._train)
        self.num_eval = len(self._eval)

    def _block(self, b: int) -> np.ndarray:
        start = b * self.seq_len
        stop = start + self.seq_len
        out = np.empty(self.seq_len, dtype=np.int64)
        i = int(np.searchsorted(self._offsets, start, side="right")) - 1
        filled = 0
        while filled < self.seq_len:  # a block may span the end of one file and the start of the next
            lo = start + filled - self._offsets[i]
            hi = min(stop - self._offsets[i], len(self._arrays[i]))
            n = int(hi - lo)
            out[filled:filled + n] = self._arrays[i][lo:hi]
            filled += n
            i += 1
        return out

    def _positions(self, b: int) -> np.ndarray:
        """Position ids of block `b`: 0 at the block's first token and at every record's first token,
        counting up from there."""
        positions = np.arange(self.seq_len, dtype=np.int64)
        if self._ends is None:
            return positions
        start = b * self.seq_len
        stop = start + self.seq_len
        i = int(np.searchsorted(self._offsets, start, side="right")) - 1
        cuts = []
        while True:
            base = int(self._offsets[i])
            lo, hi = start - base, min(stop - base, len(self._arrays[i]))
            ends = self._ends[i]
            # records ending strictly inside the block's part of this file: the next one starts there
            first, last = np.searchsorted(ends, [max(lo, 0), hi], side="right")
            cuts.append(np.asarray(ends[first:last], dtype=np.int64) + (base - start))
            nxt = base + len(self._arrays[i])
            if nxt >= stop:
                break
            cuts.append(np.array([nxt - start], dtype=np.int64))   # the next file starts a document
            i += 1
        cuts = np.concatenate(cuts)
        cuts = cuts[(cuts > 0) & (cuts < self.seq_len)]
        if len(cuts):
            starts = np.zeros(self.seq_len, dtype=np.int64)
            starts[cuts] = cuts
            positions -= np.maximum.accumulate(starts)
        return positions

    @staticmethod
    def _check(i: int, n: int, what: str) -> int:
        i = int(i)
        if not 0 <= i < n:
            raise IndexError(f"{what} block {i} out of range (0..{n - 1})")
        return i

    def train_block(self, i: int) -> np.ndarray:
        return self._block(int(self._train[self._check(i, self.num_train, "train")]))

    def eval_block(self, i: int) -> np.ndarray:
        return self._block(int(self._eval[self._check(i, self.num_eval, "eval")]))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order of train blocks in `epoch`: the same in every process for (seed, epoch)."""
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_train)

    def train_batch(self, indices) -> np.ndarray:
        idx = np.asarray(indices).reshape(-1)
        out = np.empty((len(idx), self.seq_len), dtype=np.int64)
        for row, i in enumerate(idx):
            out[row] = self.train_block(int(i))
        return out

    def eval_batch(self, indices) -> np.ndarray:
        idx = np.asarray(indices).reshape(-1)
        return np.stack([self.eval_block(int(i)) for i in idx]) if len(idx) else \
            np.empty((0, self.seq_len), dtype=np.int64)

    def _positions_of(self, indices, blocks: np.ndarray, what: str) -> np.ndarray:
        idx = np.asarray(indices).reshape(-1)
        out = np.empty((len(idx), self.seq_len), dtype=np.int64)
        for row, i in enumerate(idx):
            out[row] = self._positions(int(blocks[self._check(int(i), len(blocks), what)]))
        return out

    def train_positions(self, indices) -> np.ndarray:
        """Position ids for `train_batch(indices)`, row for row."""
        return self._positions_of(indices, self._train, "train")

    def eval_positions(self, indices) -> np.ndarray:
        """Position ids for `eval_batch(indices)`, row for row."""
        return self._positions_of(indices, self._eval, "eval")

    def __repr__(self) -> str:
        return (f"PackedDataset({len(self.files)} files, {self.tokens_total} tokens, seq_len={self.seq_len}, "
                f"train={self.num_train}, eval={self.num_eval})")


def packed_inputs(ids, positions) -> dict:
    """The model's keyword arguments for packed blocks `ids` (a torch tensor) with `positions` (their
    position ids, same shape, same device; or None). Where no row has a document starting after its first
    token, position ids are left out: the model then runs exactly as it did before packing knew about
    documents (the same causal mask, the same loss).

    Labels: the first token of a document (position 0) is no target (IGNORE_INDEX). Its prediction would come
    from the eos ending the previous, unrelated document, which under the block-diagonal mask sees only
    that document: a guess at how some other text begins, trained as noise, and a target a document
    trained alone never has. So the loss of a packed block is exactly the loss of its documents run one
    by one (tests/test_data_packed.py checks it). The eos itself stays a target: the model must learn to stop.
    A block's first token is never a target anyway (labels shift by one inside the model).
    """
    if positions is None:
        return {"input_ids": ids, "labels": ids}
    # use_cache=False: transformers reads packed documents from position ids only when no KV cache is made
    # (a model in eval mode with use_cache on in its config would make one and attend across documents).
    return {"input_ids": ids, "labels": ids.masked_fill(positions == 0, IGNORE_INDEX), "position_ids": positions,
            "use_cache": False}


def has_documents(positions: np.ndarray) -> bool:
    """Whether a document starts inside any row (after its first token) of these position ids."""
    return bool((positions[:, 1:] == 0).any())


def _where(paths: list) -> str:
    names = [str(p) for p in paths]
    return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} more)"


def build_dataset(paths, tokenizer: Any, seq_len: int, eval_fraction: float = 0.02, seed: int = 0,
                  cache_dir: Path | None = None,
                  progress: Callable[[int, int], None] | None = None) -> PackedDataset:
    """Find the files, tokenize each one not yet in the cache, and pack all into blocks."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if seq_len < 1:
        raise DataError("--seq-len", "must be at least 1")
    warnings: list[str] = []
    problems: list[DataError] = []
    files = discover_files(paths, warnings, problems)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fingerprint = tokenizer_fingerprint(tokenizer)
    sizes = [f.stat().st_size for f in files]
    total_bytes, done = sum(sizes), 0
    if progress:
        progress(0, total_bytes)
    entries: list[Entry] = []
    for path, size in zip(files, sizes):
        base = done
        report = (lambda n, base=base, size=size: progress(base + min(n, size), total_bytes)) if progress else None
        try:
            entry = cached_or_build(path, tokenizer, fingerprint, folder, report)
        except DataError as exc:   # go on: every bad file is named at the end, not just the first
            problems.append(exc)
        else:
            entries.append(entry)
            warnings.extend(f"{path}: {w}" for w in entry.meta.get("warnings", []))
        done += size
        if progress:
            progress(done, total_bytes)
    raise_data_errors(problems)
    key = hashlib.sha256(f"{PIPELINE_VERSION}|{fingerprint}|{seq_len}|{eval_fraction}".encode())
    for entry in entries:
        key.update(entry.bin_path.name.encode())
    return PackedDataset([e.array() for e in entries], seq_len, eval_fraction=eval_fraction, seed=seed,
                         files=files, fingerprint=key.hexdigest()[:16], warnings=warnings, where=_where(paths),
                         ends=[e.ends() for e in entries])
