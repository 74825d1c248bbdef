"""What a spawned worker imports before it trains: only what its job needs (the start-up time itself is
measured by bench/worker_startup.py, not here)."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

from training_core import cli
from training_core.config import JobSpec

ROOT = Path(__file__).resolve().parents[1]

# Modules a plain full finetune never needs: LoRA/QLoRA, swarms, Parquet, GGUF, and the other CLI commands.
NOT_FOR_A_FULL_FINETUNE = (
    "peft", "bitsandbytes", "hivemind", "pyarrow", "pandas", "gguf",
    "training_core.swarm", "training_core.download", "training_core.hub_search", "training_core.generate",
    "training_core.export", "training_core.gguf_export",
)

# The worker as the app starts it (`modron-train run --spec`), in-process in a fresh interpreter, so that
# what it imported can be read afterwards. Its events go to stdout; the answer goes to a file.
PROBE = """
import gc, json, sys
from training_core import cli
code = cli.main(["run", "--spec", sys.argv[1]])
with open(sys.argv[2], "w") as f:
    json.dump({"code": code, "modules": sorted(sys.modules), "gc_enabled": gc.isenabled(),
               "frozen": gc.get_freeze_count()}, f)
"""


def test_a_full_finetune_worker_imports_no_heavy_extras(tmp_path):
    spec_path = tmp_path / "job-spec.json"
    JobSpec(model="scratch:tiny", data=[str(ROOT / "resources" / "demo" / "stories")], out=str(tmp_path / "run"),
            steps=1, batch_size=2, seq_len=32, tokenizer="bytes", device="cpu", threads=1,
            sample_prompts=[]).save(spec_path)
    answer = tmp_path / "answer.json"
    out = subprocess.run([sys.executable, "-c", PROBE, str(spec_path), str(answer)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert '"type":"finished"' in out.stdout, out.stdout[-2000:]
    got = json.loads(answer.read_text())
    assert got["code"] == 0
    loaded = set(got["modules"])
    assert "torch" in loaded and "transformers" in loaded   # it did get as far as training
    heavy = sorted(m for m in NOT_FOR_A_FULL_FINETUNE if m in loaded)
    assert heavy == [], f"imported by a plain full finetune's worker: {heavy}"
    # serve() turns the collector off for its imports and must turn it back on for the run (frozen heap).
    assert got["gc_enabled"] and got["frozen"] > 100_000


def _run_help(parser: argparse.ArgumentParser) -> str:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["run"].format_help()


def test_the_workers_own_parser_is_the_full_ones_run_command():
    """main() builds only the `run` command's parser for a worker; it reads the same as the full one's."""
    small, full = cli.build_parser("run"), cli.build_parser()
    assert _run_help(small) == _run_help(full)
    for argv in (["run", "--spec", "j.json"], ["run", "--spec", "j.json", "--resume"]):
        assert vars(small.parse_args(argv)) == vars(full.parse_args(argv))


def _spare(tmp_path, env_home: Path):
    env = {**__import__("os").environ, "MODRON_DATA_DIR": str(env_home / "data"),
           "MODRON_CACHE_DIR": str(env_home / "cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "training_core.cli", "run", "--spare"], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_spare_worker_imports_first_then_runs_the_job_its_first_line_names(tmp_path):
    """`run --spare` (app/spare_worker.py): imports done before any job, `ready`, then the `job` control's
    spec runs as `run --spec` would; a second `job` is refused with a warning, not obeyed."""
    from training_core.protocol import decode_event, encode, make_control
    spec_path = tmp_path / "job-spec.json"
    JobSpec(model="scratch:tiny", data=[str(ROOT / "resources" / "demo" / "stories")], out=str(tmp_path / "run"),
            steps=3, batch_size=2, seq_len=32, tokenizer="bytes", device="cpu", threads=1,
            sample_prompts=[]).save(spec_path)
    proc = _spare(tmp_path, tmp_path)
    try:
        first = decode_event(proc.stdout.readline())
        assert first["type"] == "ready" and first["pid"] == proc.pid
        assert not (tmp_path / "run").exists()   # no job yet: nothing of one is touched
        proc.stdin.write(encode(make_control("job", spec=str(spec_path), resume=False)))
        proc.stdin.write(encode(make_control("job", spec="/elsewhere.json", resume=False)))
        proc.stdin.flush()
        types, warnings = [], []
        for line in proc.stdout:
            ev = decode_event(line)
            types.append(ev["type"])
            if ev["type"] == "warning":
                warnings.append(ev["code"])
            if ev["type"] in ("finished", "failed"):
                break
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]
    finally:
        proc.kill()
    assert types[-1] == "finished", types
    assert "started" in types and "step" in types
    assert "bad_control" in warnings
    assert json.loads((tmp_path / "run" / "job.json").read_text())["job_id"] == JobSpec.load(spec_path).job_id


def test_a_spare_worker_that_gets_no_job_leaves_quietly_and_a_bad_first_line_is_refused(tmp_path):
    from training_core.protocol import decode_event
    # (A closed stdin, the app letting a spare go, is test_app_spare_worker's TTL case.)
    cases = (('{"v":1,"type":"stop"}\n', 0), ('{"v":1,"type":"job","spec":5,"resume":false}\n', 2), ("not json\n", 2))
    procs = [_spare(tmp_path, tmp_path) for _ in cases]   # side by side: each spends seconds importing
    term = _spare(tmp_path, tmp_path)                      # and one SIGTERMed while it waits: as `stop`, exit 0
    try:
        assert decode_event(term.stdout.readline())["type"] == "ready"
        term.terminate()
        assert term.wait(timeout=60) == 0 and term.stdout.read() == ""
        for proc, (first_line, code) in zip(procs, cases):
            assert decode_event(proc.stdout.readline())["type"] == "ready"
            out, err = proc.communicate(first_line, timeout=60)
            assert proc.returncode == code, (first_line, err[-1000:])
            assert out == ""   # nothing after `ready`: no job ran
            if code == 2:
                assert err.strip().startswith("spare worker:") and len(err.strip().splitlines()) == 1, err
    finally:
        for proc in [*procs, term]:
            proc.kill()


def test_run_needs_exactly_one_of_spec_and_spare(capsys):
    for argv, words in ((["run"], "--spec FILE"), (["run", "--spare", "--spec", "j.json"], "neither --spec"),
                        (["run", "--spare", "--resume"], "neither --spec nor --resume")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("modron-train: error:") and words in err, err
