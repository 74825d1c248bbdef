"""The token cache: each data file tokenized once into a flat binary array of token ids.

An entry is `<key>.bin` (raw uint16/uint32 ids, memory-mapped when training), `<key>.ends`
(int64: where each record ends in the .bin, one past the eos appended to it; packing restarts
position ids there, see packed.py) plus `<key>.json` (counts, format, warnings, preview). The key is a hash of the file's bytes,
the tokenizer's fingerprint and PIPELINE_VERSION, so an edited file, another tokenizer or
a change in how records are rendered each make a fresh entry. All files are written under
temporary names and renamed into place, .json last: an entry without a valid .json is
ignored, so a run killed while tokenizing never leaves a bad cache behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ModelError
from ..fsutil import atomic_write_text
from .formats import FileStats, read_file

PIPELINE_VERSION = 3     # bump when rendering or tokenization changes what ends up in a cache (2: .ends,
                         # 3: records longer than LONG_RECORD_CHARS are tokenized in pieces)
LONG_RECORD_CHARS = 128 * 1024   # a fast tokenizer holds ~150 bytes per character of one input (offsets,
                                 # pre-tokens): one 50 MB JSONL record took 8-10 GB; .txt files come in pieces
HASH_BYTES = 4 << 20
BATCH_CHARS = 1 << 20    # text per tokenizer call: big enough to use every core, small for RAM
BATCH_RECORDS = 4096
STALE_TMP_S = 3600


def default_cache_dir() -> Path:
    from ..paths import cache_dir
    return cache_dir() / "tokens"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of everything about a tokenizer that changes the ids or the rendering."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        vocab = tokenizer.get_vocab()
        h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8"))
    h.update(json.dumps([getattr(tokenizer, "eos_token_id", None), len(tokenizer),
                         getattr(tokenizer, "chat_template", None)], default=str).encode("utf-8"))
    return h.hexdigest()[:20]


def token_dtype(tokenizer: Any) -> np.dtype:
    top = max(len(tokenizer), (eos_id(tokenizer) or 0) + 1)
    return np.dtype(np.uint16 if top <= 65536 else np.uint32)


def eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ModelError("tokenizer", "has no end-of-text (eos) token to separate records")
    return int(eos)


def content_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_BYTES):
            h.update(chunk)
    return h.hexdigest()


def make_encoder(tokenizer: Any) -> Callable[[list[str]], list[list[int]]]:
    """Batch encoder without special tokens, on the Rust backend when there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    if backend.truncation is not None or backend.padding is not None:
        # A tokenizer.json may carry truncation (or a previous call left it set): it would
        # silently cut our long pieces of text. Work on a copy without it.
        from tokenizers import Tokenizer
        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
    return lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]


class Entry:
    """One file's cached tokens and what was learned reading it."""

    def __init__(self, bin_path: Path, meta: dict):
        self.bin_path, self.meta = bin_path, meta

    @property
    def tokens(self) -> int:
        return int(self.meta["tokens"])

    def array(self) -> np.ndarray:
        return np.memmap(self.bin_path, dtype=np.dtype(self.meta["dtype"]), mode="r", shape=(self.tokens,))

    def ends(self) -> np.ndarray:
        """Where each record ends (exclusive, after its eos), ascending. The eos id alone cannot say this:
        a chat template may put the tokenizer's eos inside a record (Qwen's <|im_end|> after every turn,
        Mistral's </s> after every answer), and a conversation must not be cut there."""
        n = int(self.meta["records_ended"])
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        return np.memmap(self.bin_path.with_suffix(".ends"), dtype=np.int64, mode="r", shape=(n,))


def _lookup(folder: Path, key: str, fingerprint: str) -> Entry | None:
    meta_path, bin_path = folder / f"{key}.json", folder / f"{key}.bin"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("version") != PIPELINE_VERSION or meta.get("fingerprint") != fingerprint:
            return None
        if bin_path.stat().st_size != int(meta["tokens"]) * np.dtype(meta["dtype"]).itemsize:
            return None
        if folder.joinpath(f"{key}.ends").stat().st_size != int(meta["records_ended"]) * 8:
            return None
        return Entry(bin_path, meta)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _clean_stale(folder: Path) -> None:
    # Temporary files of killed runs; a live writer keeps touching its file.
    now = time.time()
    for p in folder.glob(".*.tmp-*"):
        try:
            if now - p.stat().st_mtime > STALE_TMP_S:
                p.unlink()
        except OSError:
            pass


def _in_pieces(records):
    """(text, ends_record) as read, a record longer than LONG_RECORD_CHARS cut where a .txt file's pieces are
    (a paragraph, line or word break), only its last piece ending the record."""
    from .formats import TXT_PIECE_CHARS, _cut
    for text, end in records:
        while len(text) > LONG_RECORD_CHARS:
            cut = _cut(text[:TXT_PIECE_CHARS])
            yield text[:cut], False
            text = text[cut:]
        yield text, end


def cached_or_build(path: Path, tokenizer: Any, fingerprint: str, folder: Path,
                    on_bytes: Callable[[int], None] | None = None) -> Entry:
    """The cache entry for `path`, tokenizing it first when there is none.

    on_bytes(n) reports how many bytes of the file on disk have been processed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    digest = content_hash(path)
    key = hashlib.sha256(f"{PIPELINE_VERSION}|{fingerprint}|{digest}".encode()).hexdigest()[:32]
    entry = _lookup(folder, key, fingerprint)
    if entry is not None:
        return entry
    _clean_stale(folder)
    dtype, eos = token_dtype(tokenizer), eos_id(tokenizer)
    encode = make_encoder(tokenizer)
    stats = FileStats(path)
    bin_path, ends_path = folder / f"{key}.bin", folder / f"{key}.ends"
    suffix = f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp, tmp_ends = folder / f".{key}.bin.{suffix}", folder / f".{key}.ends.{suffix}"
    total = ended = 0
    try:
        with open(tmp, "wb") as out, open(tmp_ends, "wb") as out_ends:
            batch: list[str] = []
            ends: list[bool] = []
            chars = 0

            def flush() -> None:
                nonlocal chars, total, ended
                flat: list[int] = []
                record_ends: list[int] = []
                for ids, end in zip(encode(batch), ends):
                    flat.extend(ids)
                    if end:
                        flat.append(eos)
                        record_ends.append(total + len(flat))
                arr = np.array(flat, dtype=dtype)
                arr.tofile(out)
                np.array(record_ends, dtype=np.int64).tofile(out_ends)
                total += len(arr)
                ended += len(record_ends)
                batch.clear()
                ends.clear()
                chars = 0
                if on_bytes:
                    on_bytes(stats.position())

            for text, end in _in_pieces(read_file(path, tokenizer, stats)):
                batch.append(text)
                ends.append(end)
                chars += len(text)
                if chars >= BATCH_CHARS or len(batch) >= BATCH_RECORDS:
                    flush()
            if batch:
                flush()
            for fh in (out, out_ends):
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp_ends, ends_path)
        os.replace(tmp, bin_path)
    finally:
        for t in (tmp, tmp_ends):
            if t.exists():
                t.unlink()
    meta = {
        "version": PIPELINE_VERSION, "fingerprint": fingerprint, "source": str(path), "sha256": digest,
        "dtype": dtype.name, "tokens": total, "records": stats.records, "records_ended": ended,
        "empty": stats.empty,
        "chars": stats.chars, "format": stats.format, "encoding": stats.encoding,
        "warnings": stats.warnings, "preview": stats.preview, "created": time.time(),
    }
    atomic_write_text(folder / f"{key}.json", json.dumps(meta, ensure_ascii=False))
    return Entry(bin_path, meta)
