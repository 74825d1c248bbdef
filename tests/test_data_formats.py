"""Discovery, file formats, field rules and encodings of the dataset pipeline."""
import codecs
import gzip
import json
import os
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training_core.data import SUPPORTED_EXTENSIONS, discover_files, iter_texts, validate
from training_core.data import formats
from training_core.errors import DataError

from helpers import make_tokenizer


# --- discovery -------------------------------------------------------------------------------

def test_folder_is_recursive_sorted_and_skips_hidden(tmp_path):
    d = tmp_path / "data"
    (d / "b").mkdir(parents=True)
    (d / "a").mkdir()
    (d / ".git").mkdir()
    for rel in ("b/2.txt", "b/1.jsonl", "a/z.md", "top.csv", ".hidden.txt", ".git/x.txt", "a/.swp.txt"):
        (d / rel).write_text("text\n")
    (d / "notes.pdf").write_bytes(b"%PDF")
    warnings = []
    files = discover_files([d], warnings)
    assert [f.relative_to(d).as_posix() for f in files] == ["a/z.md", "b/1.jsonl", "b/2.txt", "top.csv"]
    assert len(warnings) == 1 and "notes.pdf" in warnings[0]


def test_several_paths_keep_order_and_dedupe(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("x")
    b.write_text("y")
    assert discover_files([b, a, b, tmp_path]) == [b, a]
    assert discover_files(str(a)) == [a]


def test_supported_extensions_include_gzip_of_each(tmp_path):
    for ext in (".txt", ".md", ".jsonl", ".json", ".csv", ".parquet"):
        assert ext in SUPPORTED_EXTENSIONS and ext + ".gz" in SUPPORTED_EXTENSIONS
    p = tmp_path / "x.JSONL.GZ"
    p.write_bytes(gzip.compress(b'{"text": "hi"}\n'))
    assert discover_files([p]) == [p]
    assert list(iter_texts([p])) == ["hi"]


def test_symlinked_folder_that_is_not_a_loop(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.txt").write_text("hello")
    d = tmp_path / "data"
    d.mkdir()
    os.symlink(real, d / "linked")
    assert discover_files([d]) == [d / "linked" / "a.txt"]


def test_unicode_and_spaces_in_paths(tmp_path):
    d = tmp_path / "mes données" / "日本 語"
    d.mkdir(parents=True)
    p = d / "histoire d'été.txt"
    p.write_text("Il était une fois.", encoding="utf-8")
    assert list(iter_texts([tmp_path / "mes données"])) == ["Il était une fois."]
    report = validate([p])
    assert report.files[0].path == p and report.records == 1


# --- formats and field rules -------------------------------------------------------------------

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_txt_and_md_are_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("First line.\r\nSecond line.\n\nNew paragraph.")
    (tmp_path / "b.md").write_text("# Title\n\nBody *text*.\n")
    assert list(iter_texts([tmp_path])) == ["First line.\nSecond line.\n\nNew paragraph.", "# Title\n\nBody *text*.\n"]


def test_jsonl_text_alpaca_prompt_and_empty_records(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "plain"},
        {"Story": "capitalised field name"},
        {"instruction": "Add", "input": "2 and 2", "output": "4"},
        {"instruction": "Greet", "input": "", "output": "Hello"},
        {"prompt": "Q: sky? A:", "completion": " blue"},
        {"text": ""},
        {"text": None},
        "a bare string",
    ])
    assert list(iter_texts([p])) == [
        "plain",
        "capitalised field name",
        "### Instruction:\nAdd\n\n### Input:\n2 and 2\n\n### Response:\n4",
        "### Instruction:\nGreet\n\n### Response:\nHello",
        "Q: sky? A: blue",
        "a bare string",
    ]
    report = validate([p])
    assert report.records == 6 and report.files[0].skipped_empty == 2
    assert report.files[0].format == "mixed"
    assert report.warnings == [f"{p}: skipped 2 empty records"]


def test_chat_fallback_and_template(tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}]
    p = write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs},
                                              {"conversations": [{"from": "human", "value": "Yo"},
                                                                 {"from": "gpt", "value": "Hey"}]}])
    assert list(iter_texts([p])) == [
        "### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\nHello!",
        "### User:\nYo\n\n### Assistant:\nHey",
    ]
    tok = make_tokenizer()
    assert list(iter_texts([p], tok)) == list(iter_texts([p]))  # no template: the same fallback
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    assert list(iter_texts([p], tok)) == ["<system>Be brief.\n<user>Hi\n<assistant>Hello!\n",
                                          "<user>Yo\n<assistant>Hey\n"]
    assert validate([p]).format == "chat"


def test_json_list_object_and_single_record(tmp_path):
    a = tmp_path / "list.json"
    a.write_text(json.dumps([{"text": "one"}, {"text": "two"}], indent=2))
    b = tmp_path / "wrapped.json"
    b.write_text(json.dumps({"version": 2, "data": [{"text": "three"}]}))
    c = tmp_path / "single.json"
    c.write_text(json.dumps({"instruction": "Say hi", "output": "hi"}))
    d = tmp_path / "lines.json"  # JSON Lines saved with a .json name
    d.write_text('{"text": "four"}\n{"text": "five"}\n')
    assert list(iter_texts([a, b, c, d])) == ["one", "two", "three",
                                              "### Instruction:\nSay hi\n\n### Response:\nhi", "four", "five"]


def test_json_list_is_streamed_in_small_reads(tmp_path, monkeypatch):
    records = [{"text": f"record number {i} " + "x" * (i % 50), "n": i * 1.5} for i in range(300)]
    p = tmp_path / "big.json"
    p.write_text(json.dumps(records, indent=1))
    monkeypatch.setattr(formats, "READ_BYTES", 37)  # forces records split across reads
    assert list(iter_texts([p])) == [r["text"] for r in records]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records[:5], indent=1).replace('"n": 3.0', '"n": 3.0,'))
    with pytest.raises(DataError, match=r"line \d+: broken JSON"):
        list(iter_texts([bad]))


def test_csv_columns_quoting_and_separators(tmp_path):
    a = tmp_path / "a.csv"
    a.write_text('id,Body,tag\n1,"Hello, ""world""\nsecond line",x\n\n2,plain,y\n', encoding="utf-8")
    b = tmp_path / "b.csv"
    b.write_text("instruction;output\nSay hi;hi\n")
    assert list(iter_texts([a, b])) == ['Hello, "world"\nsecond line', "plain",
                                        "### Instruction:\nSay hi\n\n### Response:\nhi"]


def test_parquet_text_and_chat_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "PARQUET_BATCH_ROWS", 7)
    texts = [f"row {i}" for i in range(50)]
    a = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": list(range(50)), "text": texts}), a, row_group_size=16)
    b = tmp_path / "b.parquet"
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": "Hi"},
                                           {"role": "assistant", "content": "Yo"}]]}), b)
    assert list(iter_texts([a, b])) == texts + ["### User:\nHi\n\n### Assistant:\nYo"]


def test_gzip_of_each_format(tmp_path):
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": ["from parquet"]}), buf)
    payloads = {
        "a.txt.gz": b"from txt",
        "b.md.gz": b"from md",
        "c.jsonl.gz": b'{"text": "from jsonl"}\n',
        "d.json.gz": b'[{"text": "from json"}]',
        "e.csv.gz": b"text\nfrom csv\n",
        "f.parquet.gz": buf.getvalue().to_pybytes(),
    }
    for name, data in payloads.items():
        (tmp_path / name).write_bytes(gzip.compress(data))
    assert list(iter_texts([tmp_path])) == ["from txt", "from md", "from jsonl", "from json", "from csv",
                                            "from parquet"]


# --- encodings -------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding, bom, label", [
    ("utf-8", b"", "utf-8"),
    ("utf-8", codecs.BOM_UTF8, "utf-8 (BOM)"),
    ("utf-16-le", codecs.BOM_UTF16_LE, "utf-16-le"),
    ("utf-16-be", codecs.BOM_UTF16_BE, "utf-16-be"),
])
def test_unicode_encodings(tmp_path, encoding, bom, label):
    text = "Zoë's café — 東京 🚀\nline two"
    p = tmp_path / "t.txt"
    p.write_bytes(bom + text.encode(encoding))
    q = tmp_path / "t.jsonl"
    q.write_bytes(bom + (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode(encoding))
    r = tmp_path / "t.csv"
    r.write_bytes(bom + ('text\n"' + text + '"\n').encode(encoding))
    assert list(iter_texts([p, q, r])) == [text, text, text]
    report = validate([p])
    assert report.files[0].encoding == label and report.warnings == []


def test_latin1_fallback_warns(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_bytes(("plain ascii " * 10000 + "\nCafé crème, naïve façade.").encode("latin-1"))
    texts = list(iter_texts([p]))
    assert "".join(texts).endswith("Café crème, naïve façade.")
    report = validate([p])
    assert report.files[0].encoding == "latin-1"
    assert report.warnings == [f"{p}: decoded as Latin-1 (not valid UTF-8); check accented characters"]


# --- streaming -------------------------------------------------------------------------------

def test_txt_pieces_cut_at_paragraphs(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "TXT_PIECE_CHARS", 200)
    paragraphs = [f"Paragraph {i}: " + "word " * (i % 17 + 3) for i in range(100)]
    text = "\n\n".join(paragraphs)
    p = tmp_path / "book.txt"
    p.write_text(text)
    pieces = list(formats.read_file(p))
    assert "".join(t for t, _ in pieces) == text
    assert len(pieces) > 10
    assert [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]
    for t, _ in pieces[:-1]:
        assert t.endswith("\n\n") and len(t) <= 400


def test_big_txt_is_read_in_bounded_memory(tmp_path):
    p = tmp_path / "big.txt"
    para = ("The river ran past the mill and the miller sang. " * 12 + "\n\n").encode()
    with open(p, "wb") as fh:
        for _ in range(16 * 2**20 // len(para)):
            fh.write(para)
    size = p.stat().st_size
    tracemalloc.start()
    try:
        chars = sum(len(t) for t in iter_texts([p]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert chars == size
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB while reading a {size / 2**20:.0f} MiB file"
