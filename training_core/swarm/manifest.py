"""The swarm manifest: what every peer of one swarm must agree on, as TOML or as an invite.

An invite is `modron-invite:1:` + base64url(zlib(JSON of the manifest)), one short line that
people paste into chat. Invites come from strangers, so reading one is defensive: JSON only
(never pickle), a cap on the decompressed size, the same validation as a manifest file, and more:
an invite may not name anything on the reader's computer (its model is a scratch preset or a hub
id, its tokenizer built in, bundled or a hub id; see `invite_problem`).

Every number has a range (RANGES, with the reasons), checked here, before torch is imported.

Imports nothing heavy (no torch, no hivemind): the desktop app reads invites too.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import json
import math
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from ..errors import ConfigError

# Kept here instead of importing training_core.models.presets, which imports torch;
# a test checks this equals tuple(PRESETS) so the two cannot drift apart.
PRESET_NAMES = ("tiny", "mini", "small", "base", "medium")

COMPRESSIONS = ("none", "float16", "scaled_float16", "uniform8bit", "blockwise8bit", "blockwise4bit")
ALGORITHMS = ("diloco", "sync")
# hivemind's stock averagers (sync) decode by codec number: only its own codecs that work here.
SYNC_COMPRESSIONS = ("none", "float16", "scaled_float16")
DATA_SOURCES = ("bundled", "local", "url")
OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("cosine", "linear", "constant")

INVITE_PREFIX = "modron-invite:"
INVITE_VERSION = 1
MAX_INVITE_BYTES = 64 * 1024       # decompressed JSON; a hostile invite must not zip-bomb us
_MAX_INVITE_CHARS = 128 * 1024     # the pasted text (or invite file) itself

_RUN_ID = re.compile(r"[a-z0-9][a-z0-9_-]{2,63}")
_BASE58 = re.compile(r"[1-9A-HJ-NP-Za-km-z]+")   # libp2p peer ids (Qm..., 12D3Koo...)
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A Hugging Face hub repository id as an invite may name it: exactly ORG/NAME, each part letters,
# digits, '-', '_' and '.', starting and ending with a letter or digit, with no '..' or '--' (the
# hub's own rules; '--' is also its cache's separator). Nothing else: no leading '/' or '~', no
# drive letter, no backslash, no URL scheme, so it can never be read as a path on this computer.
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_REPO = re.compile(rf"{_HUB_PART}/{_HUB_PART}")
HUB_URL = "https://huggingface.co/"

# Every number a manifest holds, with its range (lowest, highest; both allowed). Invites come from
# strangers: nothing may be absurd enough to hang a peer, eat its memory or make its training
# meaningless. ([diloco] has its own bounds in _diloco.) The reasons:
RANGES: dict[str, tuple[float, float]] = {
    # Tokens per training sequence: one input and one target token at least; 32768 is more context
    # than any home swarm trains with (attention memory grows with it).
    "seq_len": (2, 32768),
    # Sequences per local step on one peer: 4096 is more than a home GPU holds even for the tiny
    # preset at seq_len 128 (over 10 GB of activations); the memory pre-flight (sources.py) refuses
    # whatever does not fit on this machine below that.
    "micro_batch": (1, 4096),
    # Samples per global epoch (algorithm "sync"): 2^24 (16.8 M) is days of work for a large home
    # swarm; beyond that an epoch never ends in practice and the schedule never moves.
    "target_batch_size": (1, 2 ** 24),
    # Adam's step moves each weight by about lr; weights start near 0.02, so lr above 1 diverges at
    # the first step, and below 1e-8 nothing is learned.
    "optimizer.lr": (1e-8, 1.0),
    # Added to sqrt(v) in Adam: above 0.1 it swamps the gradient scale; below 1e-12 it no longer keeps
    # the update finite where sqrt(v) is near 0.
    "optimizer.eps": (1e-12, 0.1),
    # Decoupled decay shrinks weights by lr·wd per step: above 1 it erases them.
    "optimizer.weight_decay": (0.0, 1.0),
    # Adam's moment decay rates: from 0 (no memory) up to, not including, 1 (never forgets; checked
    # in _optimizer, which excludes 1).
    "optimizer.betas": (0.0, 1.0),
    # Global epochs of the LR schedule: 10^7 is months of one-second epochs.
    "schedule.total_epochs": (1, 10_000_000),
    # Seconds peers wait to form an averaging group: under 0.1 s no peer over a network can answer;
    # over 5 min every round stalls that long.
    "matchmaking_time": (0.1, 300.0),
    # Seconds one all-reduce may take before it is abandoned: an hour moves a 350 M-parameter
    # model's fp16 state over a 2 Mbit/s uplink; a timeout under a second abandons every exchange.
    "averaging_timeout": (1.0, 3600.0),
}
MAX_INITIAL_PEERS = 64

DEFAULT_OPTIMIZER = {"name": "adamw", "lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.0}
_OPTIMIZER_KEYS = ("name", "lr", "betas", "eps", "weight_decay")
DEFAULT_SCHEDULE = {"name": "cosine", "warmup_epochs": 2, "total_epochs": 1000}
_SCHEDULE_KEYS = ("name", "warmup_epochs", "total_epochs")
DEFAULT_AUTH = {"required": False}
# DiLoCo rounds (arXiv 2311.08105): `inner_steps` local AdamW steps per peer, then an all-reduce of
# the peers' pseudo-gradients and an outer Nesterov SGD step (lr 0.7, momentum 0.9 as in the papers).
DEFAULT_DILOCO = {"inner_steps": 500, "outer_lr": 0.7, "outer_momentum": 0.9, "max_round_s": 1800.0,
                  "overlap": True}
_DILOCO_KEYS = tuple(DEFAULT_DILOCO)
_AUTH_KEYS = ("required", "issuer")
# Per data source: (required keys, optional keys), in the order to_toml writes them.
_DATA_KEYS = {
    "bundled": (("source", "path"), ("description",)),
    "local": (("source",), ("description",)),
    "url": (("source", "url"), ("sha256", "description")),
}


@dataclass
class SwarmManifest:
    run_id: str                  # names the hivemind run (the DHT key prefix)
    model: str                   # "scratch:NAME" or a base model (a folder in a manifest file, or a hub id)
    data: dict[str, Any]         # {"source": "bundled", "path": "demo/stories"} | {"source": "local"} | {"source": "url", "url": ...}
    algorithm: str = "diloco"    # "diloco": rounds of local steps + compressed pseudo-gradients; "sync": per-step gradients
    tokenizer: str = "bytes"     # "bytes" | a tokenizer path or hub id | "bundled:PATH" | "auto" (a base model's own)
    seq_len: int = 128
    micro_batch: int = 8
    target_batch_size: int = 4096    # sync: samples per global optimizer epoch (hivemind's target_batch_size)
    optimizer: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_OPTIMIZER))
    schedule: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SCHEDULE))
    compression: str = "float16"     # on the wire: sync's gradients, diloco's pseudo-gradients
    diloco: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_DILOCO))
    initial_peers: list[str] = field(default_factory=list)   # multiaddrs ending in /p2p/PEER_ID
    auth: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_AUTH))
    matchmaking_time: float = 5.0
    averaging_timeout: float = 30.0

    def __post_init__(self) -> None:
        # Validate and normalise here too, so code that builds or replace()s a manifest
        # cannot make one that a file could not hold.
        for name, value in _normalize(dataclasses.asdict(self), "swarm manifest").items():
            setattr(self, name, value)

    @property
    def is_scratch(self) -> bool:
        return self.model.startswith("scratch:")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)   # deep copies: callers may mutate the result

    def to_toml(self) -> str:
        # Top-level values must come before the first [table] in TOML.
        d = self.to_dict()
        tables = [k for k, v in d.items() if isinstance(v, dict)]
        lines = ["# Modron swarm manifest"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in d.items() if k not in tables]
        for name in tables:
            lines += ["", f"[{name}]"]
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in d[name].items()]
        return "\n".join(lines) + "\n"


def load_manifest(path: str | Path) -> SwarmManifest:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "no such file") from None
    except IsADirectoryError:
        raise ConfigError(path, "is a folder, not a swarm manifest (.toml)") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(path, f"cannot be read ({exc.strerror or exc})") from None
    return parse_manifest(text, str(path))


def parse_manifest(text: str, where: str) -> SwarmManifest:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message already says "(at line L, column C)".
        raise ConfigError(where, f"is not valid TOML: {_one_line(str(exc))}") from None
    return manifest_from_dict(data, where)


def manifest_from_dict(data: Any, where: str) -> SwarmManifest:
    """A manifest from parsed TOML or invite JSON; ConfigError naming `where` if it is wrong."""
    return SwarmManifest(**_normalize(data, where))


def make_invite(manifest: SwarmManifest, initial_peers: list[str] | None = None) -> str:
    """The invite string; `initial_peers` (e.g. the host's own addresses) replace the manifest's."""
    if initial_peers is not None:
        manifest = dataclasses.replace(manifest, initial_peers=list(initial_peers))
    raw = json.dumps(manifest.to_dict(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    packed = base64.urlsafe_b64encode(zlib.compress(raw, 9)).decode("ascii").rstrip("=")
    return f"{INVITE_PREFIX}{INVITE_VERSION}:{packed}"


def read_invite(text_or_path: str | Path) -> SwarmManifest:
    """The manifest in an invite string, or in a file holding one (DIR/invite.txt, or just DIR)."""
    text, where = str(text_or_path).strip(), "invite"
    if not text:   # Path("") is the current folder: never read an invite.txt from there by accident
        raise ConfigError(where, "is empty; paste the whole invite (it starts with 'modron-invite:')")
    if not text.startswith(INVITE_PREFIX):
        path = Path(text_or_path)
        try:
            if path.is_dir() and (path / "invite.txt").is_file():   # a host's --out folder
                path = path / "invite.txt"
            is_file = path.is_file()
        except (OSError, ValueError):   # names too long or with NUL bytes are not files either
            is_file = False
        if not is_file:
            # Text shaped like a file name gets "no such file"; anything else (another app's
            # invite, a stray paste) is named "invite" so the message stays one short line.
            meant_as_path = (len(text) <= 200 and not _CONTROL.search(text) and re.search(r"[/\\.]", text)
                             and not re.match(r"[\w-]+:\d+:", text))
            if not meant_as_path:
                raise ConfigError(where, f"is not a Modron invite (an invite starts with '{INVITE_PREFIX}')")
            raise ConfigError(text, f"no such file, and not an invite (an invite starts with '{INVITE_PREFIX}')")
        where = str(path)
        try:
            with open(path, "rb") as fh:
                blob = fh.read(_MAX_INVITE_CHARS + 1)
        except OSError as exc:
            raise ConfigError(where, f"cannot be read ({exc.strerror or exc})") from None
        if len(blob) > _MAX_INVITE_CHARS:
            raise ConfigError(where, "is too large to be an invite")
        try:
            text = blob.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ConfigError(where, "is not an invite (not UTF-8 text)") from None
        if not text.startswith(INVITE_PREFIX):
            raise ConfigError(where, f"does not hold a Modron invite (an invite starts with '{INVITE_PREFIX}')")
    return _decode_invite(text, where)


def bundled_path(relative: str) -> Path:
    """Absolute path of a bundled resource named in a manifest ("demo/stories")."""
    import resources
    return resources.path(*relative.split("/"))


# --- invite decoding -------------------------------------------------------------------------

def _decode_invite(text: str, where: str) -> SwarmManifest:
    if len(text) > _MAX_INVITE_CHARS:
        raise ConfigError(where, "is too large to be an invite")
    version, sep, packed = text[len(INVITE_PREFIX):].partition(":")
    if not sep:
        raise ConfigError(where, "is cut short (no version and data after the prefix)")
    if version != str(INVITE_VERSION):
        raise ConfigError(where, f"has invite version {_one_line(version)[:20]!r}; this Modron reads version "
                                 f"{INVITE_VERSION} (update Modron if the invite is newer)")
    packed = "".join(packed.split()).rstrip("=")   # chat clients may wrap long lines; padding is optional
    if not _BASE64URL.fullmatch(packed):
        raise ConfigError(where, "is damaged (its data is not base64url text); copy the whole invite again")
    try:
        blob = base64.urlsafe_b64decode(packed + "=" * (-len(packed) % 4))
    except (binascii.Error, ValueError):
        raise ConfigError(where, "is damaged (its base64 data is cut short); copy the whole invite again") from None
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(blob, MAX_INVITE_BYTES + 1)
    except zlib.error:
        raise ConfigError(where, "is damaged (its compressed data is corrupt); copy the whole invite again") from None
    if len(raw) > MAX_INVITE_BYTES:
        raise ConfigError(where, f"is too large (over {MAX_INVITE_BYTES // 1024} KiB unpacked); refusing it")
    if not inflater.eof or inflater.unused_data:
        raise ConfigError(where, "is damaged (its compressed data is incomplete); copy the whole invite again")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):   # UnicodeDecodeError is a ValueError
        raise ConfigError(where, "is damaged (its data is not valid JSON)") from None
    manifest = manifest_from_dict(data, where)
    problem = invite_problem(manifest)
    if problem:
        raise ConfigError(where, problem)
    return manifest


def is_hub_id(text: str) -> bool:
    """`text` is a hub repository id an invite may name (ORG/NAME, strictly; see _HUB_REPO)."""
    return bool(_HUB_REPO.fullmatch(text)) and ".." not in text and "--" not in text


def invite_problem(manifest: SwarmManifest) -> str | None:
    """Why this manifest cannot travel as an invite, or None. An invite comes from a stranger: it may
    not name a file or folder on the reader's computer, only a scratch preset or a hub id."""
    model, tok = manifest.model, manifest.tokenizer
    if not manifest.is_scratch and not is_hub_id(model):
        return (f"model {model[:80]!r} is not allowed in an invite: an invite names a scratch:PRESET or a "
                "Hugging Face hub id like 'org/name', never a folder on your computer")
    if tok in ("bytes", "auto") or tok.startswith("bundled:"):
        return None            # built in, the base model's own, or inside Modron (checked by _normalize)
    if not is_hub_id(tok):
        return (f"tokenizer {tok[:80]!r} is not allowed in an invite: use 'bytes', 'bundled:PATH' or a "
                "Hugging Face hub id like 'org/name', never a file or folder on your computer")
    if not manifest.is_scratch:
        return (f"tokenizer {tok[:80]!r} would not be used: the base model {model!r} brings its own; "
                "use tokenizer 'auto'")
    return None


def hub_downloads(manifest: SwarmManifest) -> list[tuple[str, str]]:
    """(what, hub id) of everything joining this swarm would download from the hub: ("model", id)
    and/or ("tokenizer", id). A peer needs the user's consent for each before it downloads them."""
    out = []
    if not manifest.is_scratch and is_hub_id(manifest.model):
        out.append(("model", manifest.model))
    if manifest.is_scratch and is_hub_id(manifest.tokenizer):
        out.append(("tokenizer", manifest.tokenizer))
    return out


# --- validation ------------------------------------------------------------------------------

_FIELDS = tuple(f.name for f in dataclasses.fields(SwarmManifest))
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SwarmManifest)
             if f.default is not dataclasses.MISSING}
_REQUIRED = ("run_id", "model", "data")


def _normalize(data: Any, where: str) -> dict[str, Any]:
    """Check a manifest's raw values; return them with defaults filled in and types made exact."""
    def fail(problem: str):
        raise ConfigError(where, problem)

    if not isinstance(data, dict):
        fail("is not a swarm manifest (expected a table of keys)")
    unknown = sorted(str(k) for k in data if k not in _FIELDS)
    if unknown:
        fail(f"unknown key(s) {', '.join(unknown)}; known keys: {', '.join(_FIELDS)}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        fail(f"missing key(s) {', '.join(missing)}")
    out: dict[str, Any] = {}

    run_id = _string(data["run_id"], "run_id", fail)
    if not _RUN_ID.fullmatch(run_id):
        fail(f"run_id {run_id[:80]!r} must be 3 to 64 characters of a-z, 0-9, '-' and '_', "
             "starting with a letter or digit")
    out["run_id"] = run_id

    model = _string(data["model"], "model", fail)
    if model.startswith("scratch:") and model[len("scratch:"):] not in PRESET_NAMES:
        fail(f"unknown preset {model[:80]!r} in model; use one of "
             + ", ".join(f"scratch:{n}" for n in PRESET_NAMES))
    out["model"] = model

    algorithm = _string(data.get("algorithm", "diloco"), "algorithm", fail)
    if algorithm not in ALGORITHMS:
        fail(f"unknown algorithm {algorithm[:40]!r}; use one of {', '.join(ALGORITHMS)}")
    out["algorithm"] = algorithm

    tokenizer = _string(data.get("tokenizer", "bytes"), "tokenizer", fail)
    if tokenizer == "train":
        fail("tokenizer 'train' would give each peer a different vocabulary; use 'bytes', "
             "'bundled:PATH', or a tokenizer path or hub id that every peer has")
    if tokenizer == "auto" and model.startswith("scratch:"):
        fail("tokenizer 'auto' needs a base model (a scratch model has no tokenizer of its own); use 'bytes'")
    if tokenizer.startswith("bundled:"):
        _relative_path(tokenizer[len("bundled:"):], "tokenizer", fail)
    out["tokenizer"] = tokenizer

    out["data"] = _data(data["data"], fail)

    for name in ("seq_len", "micro_batch", "target_batch_size"):
        out[name] = _ranged_int(data.get(name, _DEFAULTS[name]), name, fail)

    out["optimizer"] = _optimizer(data.get("optimizer", DEFAULT_OPTIMIZER), fail)
    out["schedule"] = _schedule(data.get("schedule", DEFAULT_SCHEDULE), fail)

    compression = _string(data.get("compression", "float16"), "compression", fail)
    if compression not in COMPRESSIONS:
        fail(f"unknown compression {compression[:40]!r}; use one of {', '.join(COMPRESSIONS)}")
    if algorithm == "sync" and compression not in SYNC_COMPRESSIONS:
        fail(f"compression {compression!r} needs algorithm 'diloco'; 'sync' averages with hivemind's own codecs: "
             + ", ".join(SYNC_COMPRESSIONS))
    out["compression"] = compression

    out["diloco"] = _diloco(data.get("diloco", DEFAULT_DILOCO), fail)
    out["initial_peers"] = _peers(data.get("initial_peers", []), fail)
    out["auth"] = _auth(data.get("auth", DEFAULT_AUTH), fail)

    for name in ("matchmaking_time", "averaging_timeout"):
        out[name] = _ranged_float(data.get(name, _DEFAULTS[name]), name, fail)
    return out


def _string(value: Any, name: str, fail) -> str:
    if not isinstance(value, str):
        fail(f"{name} must be a string, not {_type_name(value)}")
    if not value.strip():
        fail(f"{name} is empty")
    if _CONTROL.search(value) or len(value) > 1024:
        fail(f"{name} must be one line of at most 1024 characters")
    return value


def _positive_int(value: Any, name: str, fail) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        fail(f"{name} must be a whole number, not {_type_name(value)}")
    if value < 1:
        fail(f"{name} must be at least 1 (got {_show(value)})")
    return value


def _number(value: Any, name: str, fail) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(f"{name} must be a number, not {_type_name(value)}")
    if isinstance(value, int) and abs(value) > 10 ** 300:    # JSON ints have no limit; float() would raise
        fail(f"{name} is far out of range (got {_show(value)})")
    if not math.isfinite(value):
        fail(f"{name} must be a finite number (got {_show(value)})")
    return float(value)


def _show(value: float) -> str:
    """A number as a message shows it: short, and one line whatever its size."""
    if isinstance(value, int) and abs(value) >= 10 ** 15:
        if abs(value) < 10 ** 300:
            return f"{float(value):.3g}"
        return f"a number of about {int(abs(value).bit_length() * math.log10(2)) + 1} digits"   # no str(): 4300-digit cap
    return f"{value:g}" if isinstance(value, float) else str(value)


def _in_range(value: float, name: str, fail) -> None:
    lo, hi = RANGES[name]
    if not lo <= value <= hi:
        fail(f"{name} must be at least {_show(lo)} and at most {_show(hi)} (got {_show(value)})")


def _ranged_int(value: Any, name: str, fail) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        fail(f"{name} must be a whole number, not {_type_name(value)}")
    _in_range(value, name, fail)
    return value


def _ranged_float(value: Any, name: str, fail) -> float:
    value = _number(value, name, fail)
    _in_range(value, name, fail)
    return value


def _positive_float(value: Any, name: str, fail) -> float:
    value = _number(value, name, fail)
    if value <= 0:
        fail(f"{name} must be more than 0 (got {_show(value)})")
    return value


def _table(value: Any, name: str, known: tuple[str, ...], fail) -> dict[str, Any]:
    if not isinstance(value, dict):
        fail(f"{name} must be a table, not {_type_name(value)}")
    unknown = sorted(str(k) for k in value if k not in known)
    if unknown:
        fail(f"unknown key(s) in [{name}]: {', '.join(unknown)}; known keys: {', '.join(known)}")
    return value


def _relative_path(value: str, name: str, fail) -> str:
    # Bundled resources are named by a relative path with '/' separators on every platform.
    parts = value.split("/")
    if not value or value.startswith("/") or "\\" in value or ":" in value or any(p in ("", ".", "..") for p in parts):
        fail(f"{name} {value[:80]!r} must be a relative path inside Modron's resources, like 'demo/stories'")
    return value


def _data(value: Any, fail) -> dict[str, Any]:
    if not isinstance(value, dict):
        fail(f"data must be a table, not {_type_name(value)}")
    source = value.get("source")
    if source not in DATA_SOURCES:
        fail(f"data.source must be one of {', '.join(DATA_SOURCES)}"
             + (f" (got {str(source)[:40]!r})" if source is not None else ""))
    required, optional = _DATA_KEYS[source]
    _table(value, "data", required + optional, fail)
    missing = [k for k in required if k not in value]
    if missing:
        fail(f"data with source '{source}' needs key(s) {', '.join(missing)}")
    out = {k: _string(value[k], f"data.{k}", fail) for k in required + optional if k in value}
    if source == "bundled":
        _relative_path(out["path"], "data.path", fail)
    if source == "url" and not re.match(r"https?://[^\s/]+", out["url"]):
        fail(f"data.url {out['url'][:80]!r} must be an http:// or https:// address")
    if "sha256" in out and not _HEX64.fullmatch(out["sha256"]):
        fail("data.sha256 must be 64 lowercase hex digits")
    return out


def _optimizer(value: Any, fail) -> dict[str, Any]:
    value = {**DEFAULT_OPTIMIZER, **_table(value, "optimizer", _OPTIMIZER_KEYS, fail)}
    name = _string(value["name"], "optimizer.name", fail)
    if name not in OPTIMIZERS:
        fail(f"unknown optimizer {name[:40]!r}; use one of {', '.join(OPTIMIZERS)}")
    out: dict[str, Any] = {"name": name, "lr": _ranged_float(value["lr"], "optimizer.lr", fail)}
    betas = value["betas"]
    if not isinstance(betas, list) or len(betas) != 2:
        fail("optimizer.betas must be a list of two numbers, like [0.9, 0.95]")
    out["betas"] = [_number(b, "optimizer.betas", fail) for b in betas]
    if not all(0 <= b < 1 for b in out["betas"]):
        fail(f"optimizer.betas must each be at least 0 and below 1 (got {', '.join(_show(b) for b in out['betas'])})")
    if "eps" in value:
        out["eps"] = _ranged_float(value["eps"], "optimizer.eps", fail)
    out["weight_decay"] = _ranged_float(value["weight_decay"], "optimizer.weight_decay", fail)
    return out


def _schedule(value: Any, fail) -> dict[str, Any]:
    value = {**DEFAULT_SCHEDULE, **_table(value, "schedule", _SCHEDULE_KEYS, fail)}
    name = _string(value["name"], "schedule.name", fail)
    if name not in SCHEDULES:
        fail(f"unknown schedule {name[:40]!r}; use one of {', '.join(SCHEDULES)}")
    warmup = value["warmup_epochs"]
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        shown = _show(warmup) if isinstance(warmup, int) and not isinstance(warmup, bool) else repr(warmup)[:40]
        fail(f"schedule.warmup_epochs must be a whole number, 0 or more (got {shown})")
    total = _ranged_int(value["total_epochs"], "schedule.total_epochs", fail)
    if warmup > total:
        fail(f"schedule.warmup_epochs ({_show(warmup)}) is more than schedule.total_epochs ({total})")
    return {"name": name, "warmup_epochs": warmup, "total_epochs": total}


def _diloco(value: Any, fail) -> dict[str, Any]:
    value = {**DEFAULT_DILOCO, **_table(value, "diloco", _DILOCO_KEYS, fail)}
    steps = _positive_int(value["inner_steps"], "diloco.inner_steps", fail)
    if steps > 100_000:
        fail(f"diloco.inner_steps must be at most 100000 (got {_show(steps)})")
    lr = _positive_float(value["outer_lr"], "diloco.outer_lr", fail)
    if lr > 10:
        fail(f"diloco.outer_lr must be at most 10 (got {_show(lr)})")
    momentum = _number(value["outer_momentum"], "diloco.outer_momentum", fail)
    if not 0 <= momentum < 1:
        fail(f"diloco.outer_momentum must be at least 0 and below 1 (got {_show(momentum)})")
    deadline = _positive_float(value["max_round_s"], "diloco.max_round_s", fail)
    if deadline > 86400:
        fail(f"diloco.max_round_s must be at most 86400 (a day; got {_show(deadline)})")
    if not isinstance(value["overlap"], bool):
        fail(f"diloco.overlap must be true or false, not {_type_name(value['overlap'])}")
    return {"inner_steps": steps, "outer_lr": lr, "outer_momentum": momentum, "max_round_s": deadline,
            "overlap": value["overlap"]}


def _peers(value: Any, fail) -> list[str]:
    if not isinstance(value, list):
        fail(f"initial_peers must be a list of multiaddrs, not {_type_name(value)}")
    if len(value) > MAX_INITIAL_PEERS:
        fail(f"initial_peers lists {len(value)} addresses; at most {MAX_INITIAL_PEERS} are allowed")
    return [_multiaddr(p, fail) for p in value]


def _port(v: str) -> bool:
    return v.isdigit() and len(v) <= 5 and int(v) <= 65535


def _ip(version: int):
    def ok(v: str) -> bool:
        try:
            return ipaddress.ip_address(v).version == version
        except ValueError:
            return False
    return ok


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")
# The multiaddr protocols a swarm peer dials, and how each one's value is checked (None: no value).
# Nothing that names something on this computer (/unix/ sockets) and nothing hivemind does not speak.
_MADDR_PROTOCOLS = {
    "ip4": _ip(4), "ip6": _ip(6), "dns": _HOSTNAME.fullmatch, "dns4": _HOSTNAME.fullmatch,
    "dns6": _HOSTNAME.fullmatch, "dnsaddr": _HOSTNAME.fullmatch, "tcp": _port, "udp": _port,
    "p2p": _BASE58.fullmatch, "quic": None, "quic-v1": None, "p2p-circuit": None, "ws": None, "wss": None,
    "tls": None, "noise": None, "webtransport": None,
}


def _multiaddr(addr: Any, fail) -> str:
    addr = _string(addr, "initial_peers entry", fail)
    hint = "like '/ip4/1.2.3.4/tcp/31337/p2p/Qm...'"
    parts = addr.split("/")
    if not addr.startswith("/") or any(c.isspace() for c in addr) or "" in parts[1:]:
        fail(f"initial peer {addr[:80]!r} is not a multiaddr ({hint})")
    # Every /p2p/ must be followed by a peer id; relayed addresses have two.
    ids = [parts[i + 1] if i + 1 < len(parts) else "" for i, p in enumerate(parts) if p == "p2p"]
    if not ids:
        fail(f"initial peer {addr[:80]!r} has no /p2p/PEER_ID part ({hint})")
    if not all(_BASE58.fullmatch(i) for i in ids):
        fail(f"initial peer {addr[:80]!r} has a malformed peer id after /p2p/")
    i = 1
    while i < len(parts):
        proto = parts[i]
        if proto not in _MADDR_PROTOCOLS:
            fail(f"initial peer {addr[:80]!r} uses protocol {proto[:20]!r}, which Modron does not dial; "
                 f"use ip4, ip6 or dns addresses ({hint})")
        check = _MADDR_PROTOCOLS[proto]
        if check is not None:
            if i + 1 >= len(parts) or not check(parts[i + 1]):
                value = parts[i + 1][:60] if i + 1 < len(parts) else ""
                fail(f"initial peer {addr[:80]!r} has a bad /{proto}/ value {value!r}")
            i += 1
        i += 1
    return addr


def _auth(value: Any, fail) -> dict[str, Any]:
    value = _table(value, "auth", _AUTH_KEYS, fail)
    required = value.get("required", False)
    if not isinstance(required, bool):
        fail(f"auth.required must be true or false, not {_type_name(required)}")
    out: dict[str, Any] = {"required": required}
    if "issuer" in value:
        out["issuer"] = _string(value["issuer"], "auth.issuer", fail)
    elif required:
        fail("auth.required is true but auth.issuer (the token issuer's public key or URL) is missing")
    return out


# --- small helpers ---------------------------------------------------------------------------

def _type_name(value: Any) -> str:
    names = {str: "a string", bool: "true/false", int: "a whole number", float: "a number",
             list: "a list", dict: "a table", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_string(s: str) -> str:
    short = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    return '"' + "".join(short.get(c) or (f"\\u{ord(c):04x}" if _CONTROL.match(c) else c) for c in s) + '"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)   # repr of a finite float is valid TOML and reads back to the same float
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")
