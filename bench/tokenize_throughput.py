"""Tokenization throughput and memory of the dataset pipeline.

Writes a large synthetic .txt file (default 200 MB) to a temporary folder, trains a ~8k
byte-level BPE tokenizer on a slice of it (as tests/helpers.py does), then builds the
dataset twice: cold (tokenizing into the cache) and warm (the cache is reused).
Prints one JSON line and one readable line.

    python bench/tokenize_throughput.py --mb 100
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import make_tokenizer  # noqa: E402
from training_core.data import build_dataset  # noqa: E402

MB = 1_000_000


def write_text(path: Path, mb: int, seed: int = 0) -> None:
    """Prose-like text: Zipf-distributed made-up words, sentences and paragraphs."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ren", "tha", "es", "or", "un", "bri", "sto", "we", "ly", "an", "de", "qu", "ix"]
    words = sorted({"".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(30000)})
    weights = 1.0 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    with open(path, "w", encoding="utf-8") as fh:
        written = 0
        while written < mb * MB:
            idx = rng.choice(len(words), size=200_000, p=weights)
            sent_len = rng.integers(6, 20)
            parts = []
            for s in range(0, len(idx), sent_len):
                sentence = " ".join(words[i] for i in idx[s:s + sent_len])
                parts.append(sentence.capitalize() + (".\n\n" if s % (sent_len * 6) == 0 else ". "))
            chunk = "".join(parts)
            fh.write(chunk)
            written += len(chunk)


class PeakRSS:
    """Samples this process's RSS in a thread: the peak during one phase."""

    def __init__(self):
        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200, help="size of the generated text file in MB")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="modron-bench-") as tmp:
        tmp = Path(tmp)
        data = tmp / "corpus.txt"
        t0 = time.perf_counter()
        write_text(data, args.mb)
        gen_s = time.perf_counter() - t0
        size = data.stat().st_size
        with open(data, encoding="utf-8") as fh:
            sample = fh.read(4 * MB)
        tok = make_tokenizer(texts=[sample], vocab_size=args.vocab)
        del sample
        rss_before = psutil.Process().memory_info().rss

        with PeakRSS() as cold_rss:
            t0 = time.perf_counter()
            ds = build_dataset([data], tok, args.seq_len, cache_dir=tmp / "cache")
            cold_s = time.perf_counter() - t0
        tokens = ds.tokens_total
        del ds
        with PeakRSS() as warm_rss:
            t0 = time.perf_counter()
            ds = build_dataset([data], tok, args.seq_len, cache_dir=tmp / "cache")
            warm_s = time.perf_counter() - t0
        batch = ds.train_batch(ds.epoch_order(0)[:64])  # touch the memmaps once
        assert batch.shape == (64, args.seq_len)

    result = {
        "bench": "tokenize_throughput", "mb": round(size / MB, 1), "vocab": len(tok), "tokens": tokens,
        "generate_s": round(gen_s, 2),
        "cold_s": round(cold_s, 2), "cold_mb_per_s": round(size / MB / cold_s, 2),
        "cold_tokens_per_s": round(tokens / cold_s),
        "cached_s": round(warm_s, 3), "cached_mb_per_s": round(size / MB / warm_s, 1),
        "rss_before_mb": round(rss_before / 2**20, 1),
        "peak_rss_cold_mb": round(cold_rss.peak / 2**20, 1),
        "peak_rss_cached_mb": round(warm_rss.peak / 2**20, 1),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(result))
    print(f"{result['mb']} MB, {tokens:,} tokens: cold {cold_s:.1f} s ({result['cold_mb_per_s']} MB/s), "
          f"cached {warm_s:.2f} s ({result['cached_mb_per_s']} MB/s); RSS {result['rss_before_mb']} MB before, "
          f"peak {result['peak_rss_cold_mb']} MB cold / {result['peak_rss_cached_mb']} MB cached")


if __name__ == "__main__":
    main()
