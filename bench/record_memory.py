"""Peak RAM of tokenizing one huge JSONL record: in pieces (the data pipeline since 2026-11-29) vs whole.

Each way runs in a fresh child process that resets its RSS high-water mark first (Linux keeps it across
fork and exec) and tokenizes a one-record JSONL file of `--mb` megabytes with the tests' byte-level BPE
tokenizer, through the cache builder (training_core/data/cache.py); "whole" sets LONG_RECORD_CHARS past the
record's length, as the pipeline was before. Prints one JSON line, then the figures.

    .venv/bin/python bench/record_memory.py            # 20 MB, ~1 min on 2 cores
    .venv/bin/python bench/record_memory.py --mb 8
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys
sys.path.insert(0, 'tests')
from pathlib import Path
open('/proc/self/clear_refs', 'w').write('5')
from helpers import make_tokenizer
from training_core.data import cache
if {whole}:
    cache.LONG_RECORD_CHARS = 10 ** 12
e = cache.cached_or_build(Path({path!r}), make_tokenizer(), 'fp', Path({folder!r}))
hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0].split()[1]
print(e.tokens, len(e.ends()), hwm)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=20.0, help="the record's size in megabytes")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "one.jsonl"
        words = " ".join(f"word{i % 5000}" for i in range(int(a.mb * 1e6 / 8.3)))
        path.write_text(json.dumps({"text": words}) + "\n", encoding="utf-8")
        out = {"record_chars": len(words)}
        for way, whole in (("pieces", False), ("whole", True)):
            code = CHILD.format(whole=whole, path=str(path), folder=str(Path(tmp) / f"cache-{way}"))
            done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
            tokens, records, peak_kb = map(int, done.stdout.split())
            out[way] = {"tokens": tokens, "records": records, "peak_rss_mb": round(peak_kb / 1024)}
        out["ratio_whole_to_pieces"] = round(out["whole"]["peak_rss_mb"] / out["pieces"]["peak_rss_mb"], 1)
    print(json.dumps(out))
    for way in ("pieces", "whole"):
        print(f"{way}: peak {out[way]['peak_rss_mb']} MB, {out[way]['tokens']:,} tokens, {out[way]['records']} record")


if __name__ == "__main__":
    main()
