"""`modron-train` as a user runs it: exit codes, one-line errors, JSON output, LoRA + export."""
import json
import subprocess
import sys
from pathlib import Path


from helpers import make_local_model, write_text_dataset
from training_core.protocol import decode_event

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "training_core.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_missing_data_path_is_one_line_exit_2(tmp_path):
    missing = tmp_path / "nope" / "stories.txt"
    proc = cli("finetune", "--model", "scratch:tiny", "--data", missing, "--out", tmp_path / "run", "--steps", 2)
    assert_one_line_error(proc, str(missing))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_model_folder_without_weights_is_one_line_exit_2(tmp_path):
    data = tmp_path / "d.txt"
    write_text_dataset(data)
    folder = tmp_path / "empty model"
    folder.mkdir()
    proc = cli("finetune", "--model", folder, "--data", data, "--out", tmp_path / "run", "--steps", 2)
    assert_one_line_error(proc, "empty model")


def test_unknown_preset_and_bad_flags_are_one_line(tmp_path):
    data = tmp_path / "d.txt"
    write_text_dataset(data)
    proc = cli("finetune", "--model", "scratch:gigantic", "--data", data, "--out", tmp_path / "r", "--steps", 2)
    assert_one_line_error(proc, "gigantic", "tiny")
    proc = cli("finetune", "--model", "scratch:tiny", "--data", data, "--out", tmp_path / "r", "--steps", 0)
    assert_one_line_error(proc, "--steps")


def test_export_bad_quant_and_no_target_are_one_line(tmp_path):
    """An unknown --quant names the valid ones (not argparse's usage text); an export with nothing to write
    names every kind of output, GGUF included."""
    proc = cli("export", tmp_path, "--gguf", tmp_path / "x.gguf", "--quant", "q2_k")
    assert_one_line_error(proc, "--quant", "q2_k", "f16", "q8_0", "q4_k_m", "q6_k")
    proc = cli("export", tmp_path)
    assert_one_line_error(proc, "--merged OUT", "--adapter OUT", "--gguf OUT.gguf", "--gguf-lora OUT.gguf")


def test_hardware_json_falls_back_to_cpu():
    proc = cli("hardware", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["cpu_cores_logical"] >= 1 and report["ram_total"] > 0
    assert report["gpus"] == [] and report["nvml"] != "ok"   # this machine has no NVIDIA driver
    text = cli("hardware")
    assert text.returncode == 0 and "CPU" in text.stdout


def test_validate_prints_format_records_and_preview(tmp_path):
    data = tmp_path / "my data ü.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Say {i}", "input": "", "output": f"I say {i}."})
                              for i in range(10)), encoding="utf-8")
    proc = cli("validate", "--data", data, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["records"] == 10 and report["format"] == "alpaca"
    assert "Say 0" in report["preview"][0]
    text = cli("validate", "--data", data)
    assert text.returncode == 0 and "10" in text.stdout


def test_finetune_lora_json_then_export_merged_loads_in_plain_transformers(tmp_path):
    data = tmp_path / "train data.txt"
    write_text_dataset(data)
    base = make_local_model(tmp_path / "base model")
    out = tmp_path / "run"
    proc = cli("finetune", "--model", base, "--data", data, "--out", out, "--steps", 6, "--seq-len", 32,
               "--batch-size", 4, "--threads", 1, "--lr", 1e-2, "--json")
    assert proc.returncode == 0, proc.stderr
    events = [decode_event(l) for l in proc.stdout.splitlines()]
    started = next(e for e in events if e["type"] == "started")
    assert started["method"] == "lora" and 0 < started["params_trainable"] < started["params_total"]
    pre = next(e for e in events if e["type"] == "preflight")
    assert pre["licence"]["klass"] == "permissive"
    assert events[-1]["type"] == "finished"

    merged = tmp_path / "merged"
    proc = cli("export", out, "--merged", merged)
    assert proc.returncode == 0, proc.stderr
    check = ("import sys; from transformers import AutoModelForCausalLM, AutoTokenizer;"
             "m=AutoModelForCausalLM.from_pretrained(sys.argv[1]); t=AutoTokenizer.from_pretrained(sys.argv[1]);"
             "ids=t('Once upon a time', return_tensors='pt').input_ids;"
             "out=m.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=t.pad_token_id);"
             "print(out.shape[1]-ids.shape[1])")
    gen = subprocess.run([sys.executable, "-c", check, str(merged)], capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip() == "5"
    card = (merged / "README.md").read_text(encoding="utf-8")
    assert "apache-2.0" in card and "permissive" in card.lower()
    # Exporting again onto the same folder is refused in one line.
    assert_one_line_error(cli("export", out, "--merged", merged), str(merged))


def test_demo_runs_and_loss_falls(tmp_path):
    proc = cli("demo", "--out", tmp_path / "demo", "--steps", 40, "--json")
    assert proc.returncode == 0, proc.stderr
    events = [decode_event(l) for l in proc.stdout.splitlines()]
    steps = [e for e in events if e["type"] == "step"]
    assert events[-1]["type"] == "finished"
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert any(e["type"] == "sample" for e in events)


def test_resume_of_a_finished_run_is_harmless_and_finetune_refuses_to_overwrite(tmp_path):
    data = tmp_path / "d.txt"
    write_text_dataset(data)
    args = ["finetune", "--model", "scratch:tiny", "--tokenizer", "bytes", "--data", data, "--out", tmp_path / "r",
            "--steps", 3, "--seq-len", 32, "--batch-size", 4, "--threads", 1]
    assert cli(*args).returncode == 0
    assert_one_line_error(cli(*args), "resume")
    again = cli("resume", tmp_path / "r", "--json")
    assert again.returncode == 0, again.stderr
    assert [decode_event(l) for l in again.stdout.splitlines()][-1]["type"] == "finished"
    assert_one_line_error(cli("resume", tmp_path / "not-a-run"), "not-a-run")


# ---- a --spec file and the command line ---------------------------------------------------------
def _spec_file(path, **fields):
    path.write_text(json.dumps({"model": "scratch:tiny", "data": ["d.txt"], "steps": 3, **fields}), encoding="utf-8")
    return path


def _job_spec(*argv):
    from training_core import cli as cli_mod
    return cli_mod.job_spec(cli_mod.build_parser().parse_args([str(a) for a in argv]))


def test_a_spec_file_without_out_plans_and_takes_out_from_the_command_line(tmp_path, capsys):
    """`out` may come from --out (finetune) or be left out (plan: here); only a job with none at all is refused,
    in one line naming the file; and plan's default never overrides the file's own `out`."""
    from training_core import cli as cli_mod
    good = _spec_file(tmp_path / "good.json")
    assert _job_spec("plan", "--spec", good).out == "."
    assert _job_spec("finetune", "--spec", good, "--out", tmp_path / "x").out == str(tmp_path / "x")
    assert _job_spec("plan", "--spec", _spec_file(tmp_path / "o.json", out="there")).out == "there"
    assert _job_spec("plan", "--spec", _spec_file(tmp_path / "o2.json", out="there"), "--out", "here").out == "here"
    assert cli_mod.main(["finetune", "--spec", str(good)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(good) in err[0] and "out" in err[0] and "--out" in err[0], err
    # A type error in the file is still one line naming the file, whatever the command line adds.
    bad = _spec_file(tmp_path / "bad.json", seq_len="long")
    assert cli_mod.main(["finetune", "--spec", str(bad), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}: seq_len must be a whole number" in err[0], err
    listed = tmp_path / "list.json"
    listed.write_text("[1]", encoding="utf-8")
    assert cli_mod.main(["plan", "--spec", str(listed)]) == 2
    assert f"{listed}: is not a JSON object" in capsys.readouterr().err


def test_plan_of_a_spec_file_without_out_runs(tmp_path):
    data = tmp_path / "d.txt"
    write_text_dataset(data)
    spec = _spec_file(tmp_path / "good.json", data=[str(data)], tokenizer="bytes")
    proc = cli("plan", "--spec", spec, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["steps"] == 3


def test_a_bad_value_in_a_spec_file_names_the_file_and_its_field(tmp_path, capsys):
    """The file's value is named by the file and field; the same value typed on the command line by its flag."""
    from training_core import cli as cli_mod
    neg = _spec_file(tmp_path / "c_neg.json", steps=-5)
    for argv, said in ((["--spec", neg], f"{neg}: steps must be at least 1"),
                       (["--spec", neg, "--steps", "-1"], "--steps: must be at least 1"),
                       (["--spec", _spec_file(tmp_path / "b.json", epochs=2)], "b.json: steps: give steps or epochs"),
                       (["--spec", _spec_file(tmp_path / "m.json", method="lora")], "m.json: method: a from-scratch")):
        assert cli_mod.main(["plan", *map(str, argv)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], (said, err)
    assert _job_spec("plan", "--spec", neg, "--steps", 2).steps == 2   # the command line's value wins


def test_the_runs_preflight_line_says_wont_fit_and_the_disk(tmp_path):
    """README: the pre-flight shows "won't fit" (not "wont fit") and the disk the checkpoints need."""
    import io

    from training_core.textout import TextProgress
    stream = io.StringIO()
    ev = {"type": "preflight", "memory": {"total": 3 * 1024 ** 3}, "verdict": "wont_fit", "advice": [],
          "disk": {"needed": 2 * 1024 ** 3, "free": 1024 ** 3, "verdict": "wont_fit"},
          "licence": {"klass": "permissive", "name": None, "summary": "fine"}}
    TextProgress(stream)(ev)
    text = stream.getvalue()
    assert "memory 3.0 GB estimated, won't fit" in text, text
    disk = next(line for line in text.splitlines() if line.startswith("Disk: "))
    assert "for checkpoints" in disk and "free" in disk and disk.endswith(": won't fit"), disk
    stream = io.StringIO()
    TextProgress(stream)({**ev, "verdict": "fits", "disk": {**ev["disk"], "free": 4 * 1024 ** 3, "verdict": "fits"}})
    assert "estimated, fits" in stream.getvalue() and "won't" not in stream.getvalue()
