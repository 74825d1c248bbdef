"""Swarm manifests and invites: the demo loads, round trips are exact, bad input is one clear line."""
import base64
import dataclasses
import json
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import pytest

import resources
from training_core.errors import ConfigError
from training_core.swarm.manifest import (
    COMPRESSIONS, INVITE_PREFIX, MAX_INVITE_BYTES, PRESET_NAMES, SwarmManifest, bundled_path,
    load_manifest, make_invite, parse_manifest, read_invite,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = resources.path("swarms", "demo.toml")
PEER = "/ip4/127.0.0.1/tcp/31337/p2p/QmXr3QmfbLdZtQqBqkHDSxKkUmv7CwmTAnbiFBYRZ4wSkL"
RELAYED = ("/ip4/5.6.7.8/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
           "/p2p-circuit/p2p/12D3KooWHdqV7DwHn4ygv6W6iFHHn8bNVKvnEjnmCKPv6WDSnvm3")

MINIMAL = 'run_id = "abc"\nmodel = "scratch:tiny"\n[data]\nsource = "local"\n'


def error_line(fn, *args) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def bad_manifest(text: str) -> str:
    msg = error_line(parse_manifest, text, "m.toml")
    assert msg.startswith("m.toml: ")
    return msg


def make_blob_invite(payload: bytes, version: str = "1") -> str:
    return f"{INVITE_PREFIX}{version}:" + base64.urlsafe_b64encode(zlib.compress(payload, 9)).decode().rstrip("=")


# --- the demo and round trips ------------------------------------------------------------------

def test_demo_manifest_loads_and_its_data_is_bundled():
    m = load_manifest(DEMO)
    assert m.run_id == "modron-demo" and m.model == "scratch:tiny" and m.is_scratch
    assert m.tokenizer == "bytes" and m.compression == "blockwise8bit" and m.initial_peers == []
    assert m.algorithm == "diloco" and m.diloco["inner_steps"] == 50 and m.diloco["overlap"] is True
    assert m.data == {"source": "bundled", "path": "demo/stories"}
    assert m.target_batch_size == 256 and m.auth == {"required": False}
    stories = bundled_path(m.data["path"])
    assert stories.is_dir() and list(stories.glob("*.txt"))


def test_minimal_manifest_takes_the_defaults():
    m = parse_manifest(MINIMAL, "m.toml")
    assert m == SwarmManifest(run_id="abc", model="scratch:tiny", data={"source": "local"})
    assert m.optimizer == {"name": "adamw", "lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.0}
    assert m.schedule == {"name": "cosine", "warmup_epochs": 2, "total_epochs": 1000}
    assert (m.seq_len, m.micro_batch, m.target_batch_size, m.compression) == (128, 8, 4096, "float16")


def test_partial_tables_merge_with_defaults_and_ints_become_floats():
    m = parse_manifest(MINIMAL + '[optimizer]\nlr = 1\nweight_decay = 0\n[schedule]\nwarmup_epochs = 0\n', "m.toml")
    assert m.optimizer == {"name": "adamw", "lr": 1.0, "betas": [0.9, 0.95], "weight_decay": 0.0}
    assert type(m.optimizer["lr"]) is float and m.schedule["warmup_epochs"] == 0


def test_toml_round_trip_is_exact():
    m = load_manifest(DEMO)
    text = m.to_toml()
    again = parse_manifest(text, "again.toml")
    assert again == m
    assert again.to_toml() == text


def test_toml_round_trip_with_awkward_values(tmp_path):
    m = SwarmManifest(
        run_id="x_1-y", model='C:\\models\\my "llama"', tokenizer="bundled:tok/en.json",
        data={"source": "url", "url": "https://example.org/d.jsonl", "sha256": "ab" * 32,
              "description": "naïve café ✓ \\ \"quoted\" #not-a-comment"},
        optimizer={"name": "adam", "lr": 3e-05, "eps": 1e-08, "betas": [0, 0.999], "weight_decay": 0.1},
        schedule={"name": "constant", "warmup_epochs": 0, "total_epochs": 1},
        compression="blockwise8bit", initial_peers=[PEER, RELAYED],
        auth={"required": True, "issuer": "https://auth.example.org/key"},
        matchmaking_time=0.25, averaging_timeout=3599.5,
    )
    path = tmp_path / "m.toml"
    path.write_text(m.to_toml(), encoding="utf-8")
    assert load_manifest(path) == m
    assert load_manifest(path).data["description"] == m.data["description"]


def test_invite_round_trip_carries_manifest_and_peers():
    m = load_manifest(DEMO)
    invite = make_invite(m, [PEER, RELAYED])
    assert invite.startswith("modron-invite:1:") and "\n" not in invite and " " not in invite
    assert len(invite) < 1500
    got = read_invite(invite)
    assert got == dataclasses.replace(m, initial_peers=[PEER, RELAYED])
    assert read_invite(make_invite(m)) == m       # no peers given: the manifest's own


def test_invite_from_a_file_with_whitespace(tmp_path):
    m = load_manifest(DEMO)
    invite = make_invite(m, [PEER])
    path = tmp_path / "invite.txt"
    path.write_text(f"\n  {invite}  \n\n", encoding="utf-8")
    assert read_invite(str(path)) == read_invite(path) == read_invite(f"  {invite}\n")
    assert read_invite(path).initial_peers == [PEER]
    assert read_invite(tmp_path) == read_invite(path)    # the host's --out folder holds invite.txt


def test_invite_wrapped_by_a_chat_client_still_reads():
    invite = make_invite(load_manifest(DEMO), [PEER])
    head, data = invite[:16], invite[16:]
    wrapped = head + "\n".join(data[i:i + 60] for i in range(0, len(data), 60))
    assert read_invite(wrapped) == read_invite(invite)


def test_preset_names_match_the_model_presets():
    from training_core.models.presets import PRESETS
    assert PRESET_NAMES == tuple(PRESETS)


def test_manifest_module_imports_without_torch():
    code = "import sys, training_core.swarm.manifest; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# --- manifest errors -------------------------------------------------------------------------

def test_missing_file_and_not_toml(tmp_path):
    assert "no such file" in error_line(load_manifest, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('run_id = "abc"\nmodel = = 3\n', encoding="utf-8")
    msg = error_line(load_manifest, bad)
    assert msg.startswith(f"{bad}: is not valid TOML") and "line 2" in msg
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert "UTF-8" in error_line(load_manifest, binary)


def test_unknown_keys_are_listed_with_the_known_ones():
    msg = bad_manifest(MINIMAL.replace('model', 'modle = "x"\nlearning_rate = 1\nmodel', 1))
    assert "unknown key(s) learning_rate, modle" in msg and "known keys: run_id, model" in msg
    msg = bad_manifest(MINIMAL + "[optimizer]\nmomentum = 0.9\n")
    assert "[optimizer]: momentum" in msg and "lr" in msg
    assert "[data]: path" in bad_manifest(MINIMAL + 'path = "x"\n')
    assert "[auth]: token" in bad_manifest(MINIMAL + '[auth]\ntoken = "x"\n')


def test_missing_required_keys():
    assert "missing key(s) model, data" in bad_manifest('run_id = "abc"\n')


@pytest.mark.parametrize("line, words", [
    ('seq_len = "128"', "seq_len must be a whole number, not a string"),
    ("micro_batch = 8.0", "micro_batch must be a whole number, not a number"),
    ("target_batch_size = true", "target_batch_size must be a whole number, not true/false"),
    ("compression = 16", "compression must be a string"),
    ('initial_peers = "/ip4/1.2.3.4"', "initial_peers must be a list"),
    ("matchmaking_time = 'soon'", "matchmaking_time must be a number"),
    ("averaging_timeout = nan", "averaging_timeout must be a finite number"),
    ("tokenizer = 1979-05-27", "tokenizer must be a string, not date"),
    ("auth = true", "auth must be a table"),
])
def test_wrong_types(line, words):
    assert words in bad_manifest(line + "\n" + MINIMAL)


@pytest.mark.parametrize("run_id", ["ab", "Demo", "-demo", "de mo", "a" * 65, "dé-mo"])
def test_bad_run_id(run_id):
    msg = bad_manifest(MINIMAL.replace('"abc"', json.dumps(run_id)))
    assert "run_id" in msg and "3 to 64 characters" in msg


def test_good_run_ids():
    for run_id in ("abc", "a" * 64, "0-x_y"):
        assert parse_manifest(MINIMAL.replace('"abc"', json.dumps(run_id)), "m.toml").run_id == run_id


def test_unknown_compression_lists_the_valid_ones():
    msg = bad_manifest('compression = "gzip"\n' + MINIMAL)
    assert "unknown compression 'gzip'" in msg and ", ".join(COMPRESSIONS) in msg


@pytest.mark.parametrize("line, name", [
    ("seq_len = 0", "seq_len"), ("micro_batch = -1", "micro_batch"),
    ("target_batch_size = 0", "target_batch_size"), ("matchmaking_time = 0", "matchmaking_time"),
    ("averaging_timeout = -3.5", "averaging_timeout"),
])
def test_non_positive_sizes(line, name):
    msg = bad_manifest(line + "\n" + MINIMAL)
    assert name in msg and "at least" in msg and "at most" in msg


@pytest.mark.parametrize("addr, words", [
    ("ip4/1.2.3.4/tcp/31337/p2p/QmAbc", "is not a multiaddr"),
    ("/ip4/1.2.3.4/tcp/31337", "no /p2p/PEER_ID"),
    ("/ip4/1.2.3.4/tcp/31337/p2p/", "is not a multiaddr"),
    ("/ip4/1.2.3.4/tcp/31337/p2p/Qm0OIl", "malformed peer id"),
    ("/ip4/1.2.3.4/tcp/31337/p2p/Qm x", "is not a multiaddr"),
    ("1.2.3.4:31337", "is not a multiaddr"),
])
def test_bad_multiaddr(addr, words):
    msg = bad_manifest(f"initial_peers = [{json.dumps(PEER)}, {json.dumps(addr)}]\n" + MINIMAL)
    assert words in msg and "initial peer" in msg


def test_good_multiaddrs():
    m = parse_manifest(f"initial_peers = [{json.dumps(PEER)}, {json.dumps(RELAYED)}]\n" + MINIMAL, "m.toml")
    assert m.initial_peers == [PEER, RELAYED]


def test_unknown_preset():
    msg = bad_manifest(MINIMAL.replace("scratch:tiny", "scratch:huge"))
    assert "unknown preset 'scratch:huge'" in msg and "scratch:tiny, scratch:mini" in msg


def test_base_models_are_accepted_and_scratch_needs_a_shared_tokenizer():
    m = parse_manifest(MINIMAL.replace("scratch:tiny", "org/base-model") + "", "m.toml")
    assert not m.is_scratch
    assert parse_manifest('tokenizer = "auto"\n' + MINIMAL.replace("scratch:tiny", "org/m"), "m.toml").tokenizer == "auto"
    assert "scratch model has no tokenizer" in bad_manifest('tokenizer = "auto"\n' + MINIMAL)
    assert "different vocabulary" in bad_manifest('tokenizer = "train"\n' + MINIMAL)
    assert "relative path" in bad_manifest('tokenizer = "bundled:../../etc/passwd"\n' + MINIMAL)


@pytest.mark.parametrize("table, words", [
    ('source = "ftp"', "data.source must be one of bundled, local, url (got 'ftp')"),
    ('source = "bundled"', "needs key(s) path"),
    ('source = "bundled"\npath = "../secrets"', "relative path inside Modron's resources"),
    ('source = "bundled"\npath = "/etc"', "relative path"),
    ('source = "url"\nurl = "file:///etc/passwd"', "http:// or https://"),
    ('source = "url"\nurl = "https://x.org/d"\nsha256 = "abc"', "64 lowercase hex"),
    ('source = "local"\ndescription = "two\\nlines"', "data.description must be one line"),
])
def test_bad_data(table, words):
    assert words in bad_manifest('run_id = "abc"\nmodel = "scratch:tiny"\n[data]\n' + table + "\n")


@pytest.mark.parametrize("table, words", [
    ('[optimizer]\nname = "lion"', "unknown optimizer 'lion'; use one of adamw, adam"),
    ("[optimizer]\nlr = 0", "optimizer.lr must be at least 1e-08 and at most 1 (got 0)"),
    ("[optimizer]\nbetas = [0.9]", "two numbers"),
    ("[optimizer]\nbetas = [0.9, 1.0]", "below 1"),
    ("[optimizer]\nweight_decay = -0.1", "optimizer.weight_decay must be at least 0 and at most 1"),
    ('[schedule]\nname = "step"', "unknown schedule 'step'"),
    ("[schedule]\nwarmup_epochs = 2000", "more than schedule.total_epochs"),
    ("[schedule]\ntotal_epochs = 0", "schedule.total_epochs must be at least 1 and at most 10000000"),
    ("[auth]\nrequired = true", "auth.issuer"),
    ('[auth]\nrequired = "yes"', "auth.required must be true or false"),
])
def test_bad_optimizer_schedule_auth(table, words):
    assert words in bad_manifest(MINIMAL + table + "\n")


def test_building_a_bad_manifest_in_code_fails_too():
    m = load_manifest(DEMO)
    with pytest.raises(ConfigError, match="unknown compression"):
        dataclasses.replace(m, compression="zip")
    with pytest.raises(ConfigError, match="initial peer"):
        make_invite(m, ["not-an-address"])


# --- invite errors ---------------------------------------------------------------------------

def test_wrong_prefix_and_version():
    invite = make_invite(load_manifest(DEMO), [PEER])
    assert "not a Modron invite" in error_line(read_invite, "petals-invite:1:" + invite[16:])
    assert error_line(read_invite, "out/invite.txt").startswith("out/invite.txt: no such file, and not an invite")
    assert error_line(read_invite, "hello there").startswith("invite: is not a Modron invite")
    assert error_line(read_invite, "  \n").startswith("invite: is empty")
    msg = error_line(read_invite, invite.replace(":1:", ":2:", 1))
    assert "invite version '2'" in msg and "reads version 1" in msg
    assert "cut short" in error_line(read_invite, "modron-invite:1")


def test_bad_base64_and_bad_zlib():
    invite = make_invite(load_manifest(DEMO), [PEER])
    assert "not base64url" in error_line(read_invite, invite + "*!")
    assert read_invite(invite + "==") == read_invite(invite)     # padding is optional
    assert "base64 data is cut short" in error_line(read_invite, invite[:16] + "abcde")
    garbage = base64.urlsafe_b64encode(b"this is not zlib at all").decode()
    assert "compressed data is corrupt" in error_line(read_invite, invite[:16] + garbage)
    truncated = invite[:16] + base64.urlsafe_b64encode(
        base64.urlsafe_b64decode(invite[16:] + "==")[:-20]).decode()
    assert "incomplete" in error_line(read_invite, truncated)


def test_valid_zlib_but_not_a_manifest():
    assert "not valid JSON" in error_line(read_invite, make_blob_invite(b"{not json"))
    assert "not a swarm manifest" in error_line(read_invite, make_blob_invite(b"[1, 2]"))
    assert "not valid JSON" in error_line(read_invite, make_blob_invite(b"[" * 50_000))
    hostile = json.loads(json.dumps(load_manifest(DEMO).to_dict()))
    hostile["compression"] = "pickle"
    msg = error_line(read_invite, make_blob_invite(json.dumps(hostile).encode()))
    assert msg.startswith("invite: unknown compression 'pickle'")


def test_zip_bomb_invite_is_refused_without_inflating_it():
    bomb = make_blob_invite(b" " * (50 * 1024 * 1024))    # 50 MiB of spaces: ~70 KB compressed
    assert len(bomb) < 100_000
    tracemalloc.start()
    try:
        msg = error_line(read_invite, bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "too large" in msg and f"{MAX_INVITE_BYTES // 1024} KiB" in msg
    assert peak < 8 * 1024 * 1024, f"inflated {peak} bytes"   # never the 50 MiB
    # Just over the cap is refused too, even though it would be valid JSON (a padded manifest).
    padded = json.dumps(load_manifest(DEMO).to_dict()).encode() + b" " * MAX_INVITE_BYTES
    assert "too large" in error_line(read_invite, make_blob_invite(padded))


def test_invite_file_errors(tmp_path):
    path = tmp_path / "invite.txt"
    path.write_text("hello\n", encoding="utf-8")
    assert error_line(read_invite, path).startswith(f"{path}: does not hold a Modron invite")
    path.write_bytes(b"\xff\xfe garbage")
    assert "not UTF-8" in error_line(read_invite, path)
    path.write_text("x" * 200_000, encoding="utf-8")
    assert "too large" in error_line(read_invite, path)


# --- algorithms ---------------------------------------------------------------------------------

def test_new_swarms_default_to_diloco_with_the_papers_outer_optimizer():
    m = parse_manifest(MINIMAL, "m.toml")
    assert m.algorithm == "diloco"
    assert m.diloco == {"inner_steps": 500, "outer_lr": 0.7, "outer_momentum": 0.9, "max_round_s": 1800.0,
                        "overlap": True}
    assert parse_manifest(MINIMAL.replace('[data]', 'algorithm = "sync"\n[data]'), "m.toml").algorithm == "sync"


@pytest.mark.parametrize("table, words", [
    ('algorithm = "gossip"', "unknown algorithm 'gossip'; use one of diloco, sync"),
    ("[diloco]\ninner_steps = 0", "diloco.inner_steps must be at least 1"),
    ("[diloco]\ninner_steps = 1000000", "diloco.inner_steps must be at most 100000"),
    ("[diloco]\nouter_lr = 1e300", "diloco.outer_lr must be at most 10"),
    ("[diloco]\nouter_momentum = 1.0", "diloco.outer_momentum must be at least 0 and below 1"),
    ("[diloco]\nmax_round_s = 1e9", "diloco.max_round_s must be at most 86400"),
    ("[diloco]\noverlap = 1", "diloco.overlap must be true or false"),
    ("[diloco]\nrounds = 3", "unknown key(s) in [diloco]: rounds"),
    ('algorithm = "sync"\ncompression = "blockwise4bit"',
     "compression 'blockwise4bit' needs algorithm 'diloco'; 'sync' averages with hivemind's own codecs"),
])
def test_bad_algorithm_and_diloco_values(table, words):
    text = MINIMAL.replace("[data]", table + "\n[data]") if table.startswith("algorithm") else MINIMAL + table + "\n"
    assert words in bad_manifest(text)


# --- ranges ------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, words", [
    ("micro_batch = 100000000", "micro_batch must be at least 1 and at most 4096 (got 100000000)"),
    ("seq_len = 1", "seq_len must be at least 2 and at most 32768 (got 1)"),
    ("seq_len = 1000000", "seq_len must be at least 2 and at most 32768"),
    ("target_batch_size = 10000000000000000000", "target_batch_size"),   # TOML's ints stop at 2^63
    ("averaging_timeout = 1e300", "averaging_timeout must be at least 1 and at most 3600 (got 1e+300)"),
    ("averaging_timeout = 0.5", "averaging_timeout must be at least 1"),
    ("matchmaking_time = 1e9", "matchmaking_time must be at least 0.1 and at most 300 (got 1e+09)"),
    ("matchmaking_time = 0.01", "matchmaking_time must be at least 0.1"),
])
def test_every_top_level_number_has_a_range(line, words):
    assert words in bad_manifest(line + "\n" + MINIMAL)


@pytest.mark.parametrize("table, words", [
    ("[optimizer]\nlr = 1e300", "optimizer.lr must be at least 1e-08 and at most 1 (got 1e+300)"),
    ("[optimizer]\nlr = 1e-20", "optimizer.lr must be at least 1e-08"),
    ("[optimizer]\neps = 1", "optimizer.eps must be at least 1e-12 and at most 0.1 (got 1)"),
    ("[optimizer]\neps = 1e-30", "optimizer.eps must be at least 1e-12"),
    ("[optimizer]\nweight_decay = 1e300", "optimizer.weight_decay must be at least 0 and at most 1"),
    ("[optimizer]\nbetas = [0.9, 1e300]", "below 1"),
    ("[schedule]\ntotal_epochs = 100000000000", "schedule.total_epochs must be at least 1 and at most 10000000"),
])
def test_every_table_number_has_a_range(table, words):
    assert words in bad_manifest(MINIMAL + table + "\n")


def test_the_edges_of_each_range_are_allowed():
    m = parse_manifest("seq_len = 32768\nmicro_batch = 4096\ntarget_batch_size = 16777216\nmatchmaking_time = 0.1\n"
                       "averaging_timeout = 3600\n" + MINIMAL + "[optimizer]\nlr = 1\neps = 1e-12\nweight_decay = 1\n"
                       "[schedule]\ntotal_epochs = 10000000\nwarmup_epochs = 10000000\n", "m.toml")
    assert (m.seq_len, m.micro_batch, m.target_batch_size, m.averaging_timeout) == (32768, 4096, 2 ** 24, 3600.0)
    assert m.optimizer["lr"] == 1.0 and m.schedule["total_epochs"] == 10 ** 7


def invite_of(**changes) -> str:
    data = load_manifest(DEMO).to_dict()
    for key, value in changes.items():
        if isinstance(value, dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return make_blob_invite(json.dumps(data).encode())


@pytest.mark.parametrize("changes, words", [
    ({"optimizer": {"lr": 1e300}}, "invite: optimizer.lr must be at least 1e-08 and at most 1 (got 1e+300)"),
    ({"target_batch_size": 10 ** 40}, "invite: target_batch_size must be at least 1 and at most 16777216 (got 1e+40)"),
    ({"averaging_timeout": 1e300}, "invite: averaging_timeout must be at least 1 and at most 3600 (got 1e+300)"),
    ({"micro_batch": 10 ** 8}, "invite: micro_batch must be at least 1 and at most 4096 (got 100000000)"),
    # JSON numbers have no size limit: a 400-digit integer must not reach float() (OverflowError)
    ({"optimizer": {"lr": 10 ** 400}}, "invite: optimizer.lr is far out of range (got a number of about 401 digits)"),
    ({"target_batch_size": 10 ** 400}, "invite: target_batch_size must be at least 1 and at most 16777216 "
                                       "(got a number of about 401 digits)"),
    ({"seq_len": -(10 ** 4000)}, "invite: seq_len must be at least 2"),
    ({"diloco": {"outer_lr": 10 ** 400}}, "invite: diloco.outer_lr is far out of range"),
    ({"optimizer": {"lr": -(10 ** 400)}}, "invite: optimizer.lr is far out of range"),
])
def test_absurd_numbers_in_an_invite_are_one_line_errors(changes, words):
    assert error_line(read_invite, invite_of(**changes)).startswith(words)


# --- invites name nothing on the reader's computer -----------------------------------------------

@pytest.mark.parametrize("model", [
    "/etc", "~/models/llama", "../models/x", "./x/y", "C:\\models\\x", "C:/models/x", "models\\x",
    "org/../../etc", "org/name/extra", "https://huggingface.co/org/name", "file:///etc/passwd", "org//name",
    "org/.hidden", "org/name.", "-org/name", "org/na--me", "name-only", "/org/name",
])
def test_an_invite_cannot_name_a_local_model(model):
    msg = error_line(read_invite, invite_of(model=model, tokenizer="auto"))
    assert msg.startswith("invite: model ") and "not allowed in an invite" in msg and "never a folder" in msg


@pytest.mark.parametrize("tokenizer", ["/tmp/tok.json", "~/tok", "../tok", "tok.json", "C:\\tok", "org/name/x"])
def test_an_invite_cannot_name_a_local_tokenizer(tokenizer):
    msg = error_line(read_invite, invite_of(tokenizer=tokenizer))
    assert msg.startswith("invite: tokenizer ") and "never a file or folder" in msg


def test_an_invite_may_name_hub_ids_and_bundled_things():
    from training_core.swarm.manifest import hub_downloads
    m = read_invite(invite_of(model="Org-1/name_2.v3", tokenizer="auto"))
    assert hub_downloads(m) == [("model", "Org-1/name_2.v3")]
    m = read_invite(invite_of(tokenizer="org/tok"))
    assert m.is_scratch and hub_downloads(m) == [("tokenizer", "org/tok")]
    assert hub_downloads(read_invite(invite_of())) == []               # the demo: nothing to download
    msg = error_line(read_invite, invite_of(model="org/base", tokenizer="other/tok"))
    assert "would not be used" in msg and "use tokenizer 'auto'" in msg
    # A bundled tokenizer or data path stays inside Modron's resources (checked before).
    assert "relative path" in error_line(read_invite, invite_of(tokenizer="bundled:../../etc/passwd"))


def test_a_manifest_file_may_still_name_a_local_model(tmp_path):
    m = parse_manifest(MINIMAL.replace("scratch:tiny", str(tmp_path / "my-model")), "m.toml")
    assert m.model == str(tmp_path / "my-model")
    from training_core.swarm.manifest import invite_problem
    assert "not allowed in an invite" in invite_problem(m)


@pytest.mark.parametrize("addr, words", [
    ("/unix/tmp/p2pd.sock/p2p/QmXr3QmfbLdZtQqBqkHDSxKkUmv7CwmTAnbiFBYRZ4wSkL", "protocol 'unix'"),
    ("/ip4/1.2.3.4/tcp/99999/p2p/QmXr3QmfbLdZtQqBqkHDSxKkUmv7CwmTAnbiFBYRZ4wSkL", "bad /tcp/ value '99999'"),
    ("/ip4/999.1.1.1/tcp/1/p2p/QmXr3QmfbLdZtQqBqkHDSxKkUmv7CwmTAnbiFBYRZ4wSkL", "bad /ip4/ value"),
    ("/ip6/1.2.3.4/tcp/1/p2p/QmXr3QmfbLdZtQqBqkHDSxKkUmv7CwmTAnbiFBYRZ4wSkL", "bad /ip6/ value"),
    ("/dns4/-bad-/tcp/1/p2p/QmXr3QmfbLdZtQqBqkHDSxKkUmv7CwmTAnbiFBYRZ4wSkL", "bad /dns4/ value"),
])
def test_initial_peers_use_network_protocols_only(addr, words):
    assert words in bad_manifest(f"initial_peers = [{json.dumps(addr)}]\n" + MINIMAL)


def test_initial_peers_are_bounded_and_dns_or_quic_addresses_are_fine():
    ok = ["/dns4/swarm.example.org/tcp/31337/p2p/QmXr3QmfbLdZtQqBqkHDSxKkUmv7CwmTAnbiFBYRZ4wSkL",
          "/ip6/::1/udp/4001/quic-v1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"]
    assert parse_manifest(f"initial_peers = {json.dumps(ok)}\n" + MINIMAL, "m.toml").initial_peers == ok
    assert "at most 64" in bad_manifest(f"initial_peers = {json.dumps([PEER] * 65)}\n" + MINIMAL)


def test_huge_numbers_anywhere_give_short_lines():
    for changes in ({"schedule": {"warmup_epochs": 10 ** 4000}}, {"diloco": {"inner_steps": 10 ** 4000}},
                    {"diloco": {"max_round_s": -(10 ** 4000)}}, {"optimizer": {"betas": [0.9, 10 ** 4000]}},
                    {"matchmaking_time": 10 ** 4000}):
        msg = error_line(read_invite, invite_of(**changes))
        assert len(msg) < 200, msg
