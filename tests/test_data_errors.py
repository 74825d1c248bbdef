"""Bad input: each case raises a DataError whose one line names the file and the problem."""
import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training_core.data import SUPPORTED_EXTENSIONS, build_dataset, discover_files, iter_texts, validate
from training_core.errors import DataError, UserError

from helpers import make_tokenizer


def err_of(paths, *words, tokenizer=None):
    """Validate `paths`, expect a DataError, check it is one line naming `words`; return it."""
    paths = paths if isinstance(paths, list) else [paths]
    with pytest.raises(DataError) as info:
        validate(paths, tokenizer=tokenizer)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert isinstance(info.value, UserError)
    for w in words:
        assert str(w).lower() in msg.lower(), f"{w!r} not in {msg!r}"
    return msg


def test_empty_file(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_bytes(b"")
    err_of(p, p, "empty")


def test_whitespace_only(tmp_path):
    p = tmp_path / "blank.txt"
    p.write_text("  \n\n\t \r\n   \n")
    err_of(p, p, "only whitespace")
    q = tmp_path / "blank.jsonl"
    q.write_text("\n\n   \n")
    err_of(q, q, "only whitespace")


def test_nul_filled_file(tmp_path):
    p = tmp_path / "zeros.txt"
    p.write_bytes(b"\x00" * 5000)
    err_of(p, p, "NUL")


def test_binary_file(tmp_path):
    p = tmp_path / "blob.jsonl"
    p.write_bytes(bytes(range(256)) * 40)
    err_of(p, p, "binary")


def test_png_renamed_txt(tmp_path):
    p = tmp_path / "picture.txt"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + os.urandom(500))
    err_of(p, p, "PNG image", "not text")


def test_broken_json_line_names_line(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n')
    err_of(p, p, "line 3", "JSON")


def test_broken_json_file_names_line(tmp_path):
    p = tmp_path / "data.json"
    p.write_text('[\n {"text": "a"},\n {"text": "b",,}\n]\n')
    err_of(p, p, "line 3", "JSON")


def test_records_without_text_field(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"title": "x", "author": "y"}\n')
    msg = err_of(p, p, "line 1", "no text field", "title", "author")
    for accepted in ("text", "content", "instruction", "messages"):
        assert accepted in msg


def test_text_field_is_a_number(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"text": "fine"}\n{"text": 42}\n')
    err_of(p, p, "line 2", "'text'", "number")


def test_chat_messages_without_roles(tmp_path):
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps({"messages": [{"content": "hi"}, {"content": "hello"}]}) + "\n")
    err_of(p, p, "line 1", "message 1", "role")


def test_chat_messages_not_a_list(tmp_path):
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps({"messages": 7}) + "\n")
    err_of(p, p, "line 1", "not a list")


@pytest.mark.parametrize("template, problem", [
    ("{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}", "did not finish within"),
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
    ("{% for m in messages %}", "TemplateSyntaxError"),
])
def test_a_chat_template_that_hangs_or_fails_is_one_line(tmp_path, monkeypatch, template, problem):
    """A downloaded chat template is the model author's program: a loop of hours is given up on (here after
    0.3 s), and whatever it raises is one line naming the record, never a traceback."""
    from training_core import chat_template
    monkeypatch.setattr(chat_template, "TEMPLATE_SECONDS", 0.3)
    tok = make_tokenizer()
    tok.chat_template = template
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                 + "\n")
    err_of(p, p, "line 1", problem, tokenizer=tok)


def test_alpaca_without_output(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"instruction": "do it", "input": ""}) + "\n")
    err_of(p, p, "instruction", "output")


def test_csv_without_text_column(tmp_path):
    p = tmp_path / "table.csv"
    p.write_text("id,title,score\n1,a,3\n")
    err_of(p, p, "no text column", "id, title, score", "text", "content", "body", "story")


def test_csv_ragged_rows_names_line(tmp_path):
    p = tmp_path / "table.csv"
    p.write_text('id,text\n1,"hello"\n2,"multi\nline"\n3,bye,extra\n')
    err_of(p, p, "line 5", "3 fields", "header has 2")


def test_truncated_parquet(tmp_path):
    p = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": [f"row {i} " * 20 for i in range(200)]}), p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    err_of(p, p, "Parquet", "truncated")


def test_parquet_without_text_column(tmp_path):
    p = tmp_path / "data.parquet"
    pq.write_table(pa.table({"label": [1, 2], "title": ["a", "b"]}), p)
    err_of(p, p, "no text column", "label", "title")


def test_parquet_text_column_of_numbers(tmp_path):
    p = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": [1.5, 2.5]}), p)
    err_of(p, p, "row 1", "number")


def test_unsupported_extension_lists_supported(tmp_path):
    p = tmp_path / "notes.docx"
    p.write_text("hello")
    msg = err_of(p, p, "unsupported")
    for ext in (".txt", ".md", ".jsonl", ".json", ".csv", ".parquet", ".gz"):
        assert ext in msg
    assert {".txt", ".jsonl", ".parquet"} <= set(SUPPORTED_EXTENSIONS)


def test_missing_path(tmp_path):
    p = tmp_path / "nowhere" / "data.txt"
    err_of(p, p, "no such file")


def test_empty_folder(tmp_path):
    d = tmp_path / "empty dir"
    d.mkdir()
    err_of(d, d, "no data files")


def test_folder_with_only_unsupported_files(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.pdf").write_bytes(b"%PDF-1.4")
    (d / ".hidden.txt").write_text("hidden text")
    err_of(d, d, "no data files", "a.pdf")


def test_symlink_loop(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "a.txt").write_text("some text")
    os.symlink(d, d / "sub" / "back")
    with pytest.raises(DataError) as info:
        discover_files([d])
    msg = str(info.value)
    assert "symlink loop" in msg and str(d / "sub" / "back") in msg and "\n" not in msg


def test_broken_symlink(tmp_path):
    link = tmp_path / "link.txt"
    os.symlink(tmp_path / "gone.txt", link)
    err_of(link, link, "broken symlink")


def test_bad_gzip(tmp_path):
    p = tmp_path / "data.jsonl.gz"
    p.write_text('{"text": "not compressed"}\n')
    err_of(p, p, "gzip")
    q = tmp_path / "cut.txt.gz"
    q.write_bytes(gzip.compress(os.urandom(20000).hex().encode())[:3000])
    err_of(q, q, "truncated")


def test_all_records_empty(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"text": ""}\n{"text": "  "}\n{"text": null}\n')
    err_of(p, p, "all 3 records are empty")


def test_json_of_wrong_shape(tmp_path):
    p = tmp_path / "data.json"
    p.write_text('"just a string"')
    err_of(p, p, "expected a JSON list")
    q = tmp_path / "obj.json"
    q.write_text('{"name": "x", "size": 3}')
    err_of(q, q, "expected a list of records", "name", "size")


def test_json_list_not_closed(tmp_path):
    p = tmp_path / "data.json"
    p.write_text('[{"text": "a"}, {"text": "b"}\n')
    err_of(p, p, "broken JSON")


def test_chat_template_rejection_is_one_line(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "{{ m['content'] }}{% endfor %}")
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "system", "content": "x"},
                                          {"role": "user", "content": "y"}]}) + "\n")
    err_of(p, p, "line 1", "chat template", "System role not supported", tokenizer=tok)


def test_too_few_tokens_suggests_smaller_seq_len(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text("just a few words")
    tok = make_tokenizer()
    with pytest.raises(DataError) as info:
        build_dataset([p], tok, seq_len=512, cache_dir=tmp_path / "cache")
    msg = str(info.value)
    n = len(tok("just a few words", add_special_tokens=False)["input_ids"]) + 1
    assert f"only {n} tokens" in msg and "--seq-len" in msg and str(p) in msg and "\n" not in msg


def test_errors_also_raised_by_iter_texts(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        list(iter_texts([p]))
