"""validate(): the report the CLI prints before a run."""
import json

from training_core.data import ValidationReport, build_dataset, validate

from helpers import make_tokenizer


def test_report_without_tokenizer(tmp_path):
    long_text = "A long first record. " * 40
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t},
                                                  {"role": "assistant", "content": "ok"}]}) + "\n"
                         for t in (long_text, "second", "third", "fourth")))
    report = validate([p])
    assert isinstance(report, ValidationReport)
    assert report.format == "chat" and report.records == 4 and report.tokens is None
    rendered = [f"### User:\n{t}\n\n### Assistant:\nok" for t in (long_text, "second", "third")]
    assert report.chars == sum(len(r) for r in rendered) + len("### User:\nfourth\n\n### Assistant:\nok")
    assert report.preview == [rendered[0][:300]] + rendered[1:]
    assert len(report.preview[0]) == 300
    f = report.files[0]
    assert (f.path, f.format, f.encoding, f.records, f.tokens, f.warnings) == (p, "chat", "utf-8", 4, None, [])
    assert len(validate([p], preview=1).preview) == 1


def test_report_with_tokenizer_counts_tokens(tmp_path):
    tok = make_tokenizer()
    (tmp_path / "a.txt").write_text("The keeper counted ships.")
    (tmp_path / "b.jsonl").write_text('{"instruction": "Count", "output": "three"}\n{"text": ""}\n')
    report = validate([tmp_path], tokenizer=tok)
    expected = (len(tok("The keeper counted ships.", add_special_tokens=False)["input_ids"]) + 1
                + len(tok("### Instruction:\nCount\n\n### Response:\nthree", add_special_tokens=False)["input_ids"]) + 1)
    assert report.tokens == expected
    assert [f.tokens for f in report.files] == [expected - report.files[1].tokens, report.files[1].tokens]
    assert report.format == "mixed" and [f.format for f in report.files] == ["text", "alpaca"]
    assert report.warnings == [f"{tmp_path / 'b.jsonl'}: skipped 1 empty record"]
    ds = build_dataset([tmp_path], tok, seq_len=4)
    assert ds.tokens_total == report.tokens and ds.warnings == report.warnings


def test_to_dict_and_format_text(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_bytes("Caf\xe9 au lait.\n\nSecond paragraph.".encode("latin-1"))
    report = validate([p])
    d = report.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["files"][0]["path"] == str(p) and d["format"] == "text" and d["tokens"] is None
    text = report.format_text()
    assert str(p) in text and "latin-1" in text and "Latin-1" in text and "Café au lait." in text
    assert text.startswith("1 file, 1 record, 32 characters; format: text\n")
