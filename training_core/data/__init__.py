"""The dataset pipeline: find files, read and render records, tokenize into a cache, pack blocks.

    discover.py   files and folders -> sorted list of data files
    encoding.py   gzip, byte-order marks, UTF-8 / Latin-1, binary refusal
    records.py    field rules shared by JSON, CSV and Parquet (text, alpaca, chat, prompt)
    formats.py    one streaming reader per file format
    cache.py      tokenization into memory-mappable cache files, keyed by content + tokenizer
    packed.py     PackedDataset: blocks, eval split, per-epoch order
    report.py     validate() and its report, and iter_texts
"""
from .cache import PIPELINE_VERSION, tokenizer_fingerprint
from .discover import SUPPORTED_EXTENSIONS, discover_files
from .packed import PackedDataset, build_dataset
from .report import FileReport, ValidationReport, iter_texts, validate

__all__ = [
    "SUPPORTED_EXTENSIONS", "PIPELINE_VERSION", "discover_files", "iter_texts", "validate", "build_dataset",
    "PackedDataset", "ValidationReport", "FileReport", "tokenizer_fingerprint",
]
