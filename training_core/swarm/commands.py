"""`modron-train swarm join|host|invite`: argument handling around the swarm peer and the host.

In --json mode, stdout carries protocol events only (anything a library prints goes to stderr)
and control messages are read from stdin, exactly as in `modron-train run`.

`swarm join` checks everything it can before torch is imported: the manifest or invite (every number
in range, nothing on this computer named by an invite), the user's consent to each hub download an
invite asks for (--accept-download ORG/NAME), and the memory the swarm's training needs against the
most this machine has; then, with torch, against the device the engine will use (peer.prepare_sources).
"""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from ..controls import Controls, read_controls
from ..errors import ConfigError, UserError
from ..proc_guard import own_children
from ..protocol import encode, make_event
from ..textout import PROG, TextProgress
from .manifest import INVITE_PREFIX, SwarmManifest, invite_problem, load_manifest, make_invite, read_invite

_DEVICE = re.compile(r"auto|cpu|cuda(:\d{1,3})?")


def manifest_from_args(args) -> SwarmManifest:
    return manifest_source(args)[0]


def manifest_source(args) -> tuple[SwarmManifest, str, bool]:
    """(manifest, the name errors give it, whether it came from an invite). An invite is a stranger's;
    a manifest file is the operator's own, and only it may name a folder on this computer."""
    given = [x for x in (getattr(args, "invite", None), getattr(args, "invite_file", None),
                         getattr(args, "manifest", None)) if x]
    if len(given) != 1:
        raise ConfigError("swarm", "give exactly one of --invite TEXT, --invite-file FILE or --manifest M.toml")
    if getattr(args, "manifest", None):
        return load_manifest(args.manifest), str(args.manifest), False
    text = args.invite or args.invite_file
    where = "invite" if str(text).strip().startswith(INVITE_PREFIX) else str(text).strip()
    return read_invite(text), where, True


def check_join_args(args) -> None:
    """The numbers and names `swarm join` takes from its own command line, before anything starts."""
    if not _DEVICE.fullmatch(args.device or ""):
        raise ConfigError("--device", f"{str(args.device)[:40]!r} is not a device; use auto, cpu, cuda or cuda:N")
    if args.vram_fraction is not None and not 0 < args.vram_fraction <= 1:
        raise ConfigError("--vram-fraction", f"must be more than 0 and at most 1 (got {args.vram_fraction:g})")
    for flag, value in (("--steps", args.steps), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise ConfigError(flag, f"must be at least 1 (got {value})")
    if args.minutes is not None and not 0 < args.minutes <= 1e7:     # 1e7 minutes: 19 years; NaN fails too
        raise ConfigError("--minutes", f"must be more than 0 and at most 10000000 (got {args.minutes:g})")
    if not 0 <= args.port <= 65535:
        raise ConfigError("--port", f"must be from 0 to 65535 (got {args.port})")


class Output:
    """Where events go: JSON lines on the real stdout, or short human lines on stderr."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.lock = threading.Lock()
        self.last_word = False     # stopped/finished/failed said: a second one (StopWatchdog's) is dropped
        if as_json:
            events_fd = os.dup(1)
            os.dup2(2, 1)            # libraries' prints must not corrupt the event stream
            sys.stdout = sys.stderr
            self.stream = os.fdopen(events_fd, "w", encoding="utf-8", buffering=1)
        else:
            self.text = TextProgress()

    def __call__(self, ev: dict) -> None:
        with self.lock:
            if ev["type"] in ("stopped", "finished", "failed"):
                if self.last_word:
                    return
                self.last_word = True
            if self.as_json:
                self.stream.write(encode(ev))
                self.stream.flush()
            elif ev["type"] == "swarm":
                loss = f"{ev['loss']:.4f}" if ev.get("loss") is not None else "-"
                sys.stderr.write(f"swarm {ev['run_id']}: epoch {ev['epoch']}, {ev['peers']} peers, "
                                 f"{ev.get('global_samples_per_s') or 0:.1f} samples/s, loss {loss}, "
                                 f"contributed {ev['samples_contributed']} samples\n")
            elif ev["type"] == "invite":
                print(ev["invite"], flush=True)
            elif ev["type"] in ("started", "stopped"):
                if ev["type"] == "started":
                    sys.stderr.write(f"joined swarm {ev['job_id']} as {ev['run_dir']}\n")
                else:
                    sys.stderr.write(f"stopped at local step {ev['step']}\n")
            else:
                self.text(ev)


def _control_stream():
    """Our own file object on a copy of fd 0, with sys.stdin pointed at /dev/null.

    hivemind forks helper processes, and a forked child closes sys.stdin on start: if our reader
    thread held sys.stdin's lock at that moment, the child would hang forever.
    """
    stream = os.fdopen(os.dup(sys.stdin.fileno()), "r", encoding="utf-8", errors="replace")
    sys.stdin = open(os.devnull, encoding="utf-8")
    return stream


def _post_stop(controls) -> None:
    """Queue a `stop` from a signal handler. The handler runs in the main thread, which may hold the
    inbox's lock at that moment (inside Controls.poll/wait): putting from here could deadlock, so a
    helper thread puts it. (Not Controls.stop(): that would also end the set-up of a swarm at once,
    abandoning a DHT half started, where this stop is obeyed after set-up, in the loop.)"""
    threading.Thread(target=controls.put, args=("stop",), name="stop-signal", daemon=True).start()


def _install_stop_signals(on_stop) -> None:
    """SIGTERM/SIGINT ask for a clean stop; a second one leaves at once (e.g. while the DHT is
    still starting and nothing reads the control inbox yet)."""
    seen = []

    def handler(signum, frame):
        if seen:
            from .network import reap_children
            reap_children(grace_s=0.5)
            os._exit(128 + signum)
        seen.append(signum)
        on_stop(signum, frame)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _fail(out: Output | None, exc: UserError, step: int = 0) -> int:
    sys.stderr.write(f"{PROG}: error: {exc}\n")
    if out is not None and out.as_json:
        out(make_event("failed", code=exc.code, message=str(exc), step=step))
    return 2


def _test_sleep_per_step() -> float:
    """MODRON_TEST_SLEEP_PER_STEP (tests only): seconds of sleep after each step, 0 to 1."""
    try:
        return min(1.0, max(0.0, float(os.environ.get("MODRON_TEST_SLEEP_PER_STEP") or 0.0)))
    except ValueError:
        return 0.0


def cmd_join(args) -> int:
    own_children()      # before hivemind forks anything: its DHT, averagers and p2pd die with us
    out = Output(args.json)
    try:
        # Before torch: the arguments, the manifest's ranges, consent to downloads, and whether the
        # swarm's training could fit in the most memory this machine has (an absurd manifest is
        # refused in well under a second).
        check_join_args(args)
        manifest, where, from_invite = manifest_source(args)
        from . import sources
        if from_invite:
            sources.require_consent(manifest, args.accept_download or [], where)
        limit, where_memory, device, precision = sources.largest_memory(args.device, args.vram_fraction)
        sources.check_fits(manifest, where, limit=limit, where_memory=where_memory, device=device,
                           precision=precision)
        from .peer import PeerOptions, prepare_sources, swarm_engine
        opts = PeerOptions(steps=args.steps, minutes=args.minutes, device=args.device, threads=args.threads,
                           data_dir=args.data_dir, client_mode=args.client_mode, token=args.token,
                           host_maddrs=[f"/ip4/{args.listen_ip}/tcp/{args.port}"],
                           test_send_nan=os.environ.get("MODRON_TEST_SEND_NAN") == "1",
                           test_sleep_per_step=_test_sleep_per_step(),
                           vram_fraction=args.vram_fraction)
        if args.vram_fraction:
            import torch
            if torch.cuda.is_available():
                torch.cuda.set_per_process_memory_fraction(args.vram_fraction)
        prepare_sources(manifest, opts, where, from_invite)
        controls = Controls()
        engine = swarm_engine(manifest, opts, out, controls)
    except UserError as exc:
        return _fail(out, exc)

    watchdog = StopWatchdog(engine, out)

    def on_control(kind: str) -> None:
        if kind in ("pause", "stop"):
            engine.strategy.interrupt()
        if kind == "stop":
            watchdog.start()

    def on_signal(signum, frame):
        _post_stop(controls)
        on_control("stop")
    _install_stop_signals(on_signal)
    if args.json:
        threading.Thread(target=read_controls, args=(_control_stream(), controls, out, on_control),
                         daemon=True).start()
    rc = _run(engine, out)
    watchdog.done.set()
    _exit_if_leave_abandoned(engine, rc)
    return rc


STOP_GRACE_S = 15.0


class StopWatchdog:
    """After `stop`, a peer still inside one hivemind step STOP_GRACE_S later says `stopped` and ends.

    hivemind's sync Optimizer waits inside its step for a state-averaging round it started itself
    (up to averaging_timeout, minutes on a slow link; its control is not ours to cancel), and a sync
    peer asked to stop on the bench's link was still there when the bench gave up on it. The swarm
    holds the state, so leaving without the round loses nothing; a peer checkpointing or leaving is
    not inside a step, and this never cuts that short."""

    def __init__(self, engine, out: Output):
        self.engine, self.out = engine, out
        self.done = threading.Event()
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            threading.Thread(target=self._watch, args=(time.monotonic(),), name="modron-stop-watchdog",
                             daemon=True).start()

    def _watch(self, asked_at: float) -> None:
        while not self.done.wait(1.0):
            since = getattr(self.engine.strategy, "stepping_since", None)
            if since is not None and time.monotonic() - max(since, asked_at) >= STOP_GRACE_S:
                break
        else:
            return
        engine, out = self.engine, self.out
        out(make_event("warning", code="stop_forced", message=f"a swarm round still held this peer "
                                                              f"{STOP_GRACE_S:.0f} s after stop; left without it"))
        out(make_event("stopped", step=engine.step, checkpoint=None))
        _end_process(0)


def _run(engine, out: Output) -> int:
    try:
        engine.run()
    except UserError as exc:
        return _fail(out, exc, engine.step)
    except Exception as exc:
        if not out.as_json:
            raise                      # cli.main logs it and exits 1
        import traceback
        traceback.print_exc(file=sys.stderr)
        out(make_event("failed", code="internal", message=f"internal error: {type(exc).__name__}: {exc}",
                       step=engine.step))
        return 1
    return 0


def _exit_if_leave_abandoned(engine, rc: int) -> None:
    """A leave given up on left a non-daemon hivemind thread waiting out a round (up to
    averaging_timeout, minutes on a slow link); Python would join it at exit, so a peer that had
    said `stopped` stayed alive. Everything is said and saved by now: end the process here."""
    if getattr(engine.strategy, "leave_abandoned", False):
        _end_process(rc)


def _end_process(rc: int) -> None:
    """Flush what was said, end our helper processes, and exit without joining hivemind's threads."""
    from .network import reap_children
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    reap_children(grace_s=0.5)
    os._exit(rc)


def cmd_host(args) -> int:
    own_children()      # as in cmd_join: a host killed with kill -9 must not keep its port through p2pd
    from .host import HostOptions, run_host
    out = Output(args.json)
    try:
        manifest = load_manifest(args.manifest)
        problem = invite_problem(manifest)
        if problem:   # the host's own choice, but nobody will be able to join with its invite
            message = f"{args.manifest}: {problem}; peers can join only with --manifest naming the same folder"
            if args.json:
                out(make_event("warning", code="invite", message=message))
            else:
                sys.stderr.write(f"warning: {message}\n")
        opts = HostOptions(out=Path(args.out), port=args.port, listen_ip=args.listen_ip,
                           announce_ip=args.announce_ip, minutes=args.minutes, token=args.token,
                           checkpoint_minutes=args.checkpoint_minutes, threads=args.threads)
        controls, stopping = Controls(), threading.Event()

        def on_control(kind: str) -> None:
            if kind == "stop":
                stopping.set()

        def on_signal(*_) -> None:
            _post_stop(controls)
            stopping.set()
        _install_stop_signals(on_signal)
        if args.json:
            threading.Thread(target=read_controls, args=(_control_stream(), controls, out, on_control),
                             daemon=True).start()
        run_host(manifest, opts, out, controls, stopping)
    except UserError as exc:
        return _fail(out, exc)
    return 0


def cmd_invite(args) -> int:
    manifest = load_manifest(args.manifest)
    problem = invite_problem(manifest)
    if problem:
        raise ConfigError(args.manifest, problem)
    print(make_invite(manifest, list(args.peer) if args.peer else None))
    return 0


def add_parser(sub) -> None:
    from .network import DEFAULT_HOST_PORT
    s = sub.add_parser("swarm", help="train one model together with other people's computers (hivemind)")
    ss = s.add_subparsers(dest="swarm_command", required=True, metavar="SWARM_COMMAND")

    j = ss.add_parser("join", help="contribute to a swarm")
    g = j.add_mutually_exclusive_group()
    g.add_argument("--invite", help="the invite text (modron-invite:...) or a file holding it")
    g.add_argument("--invite-file", help="a file holding the invite")
    g.add_argument("--manifest", help="a swarm manifest (.toml)")
    b = j.add_mutually_exclusive_group()
    b.add_argument("--steps", type=int, help="leave after this many local steps")
    b.add_argument("--minutes", type=float, help="leave after this many minutes")
    j.add_argument("--device", default="auto")
    j.add_argument("--threads", type=int)
    j.add_argument("--vram-fraction", type=float)
    j.add_argument("--data-dir", help="this peer's data (swarms whose data is local or a download)")
    j.add_argument("--client-mode", choices=["on", "off", "auto"], default="auto",
                   help="client peers make only outgoing connections (auto: decided by a reachability check)")
    j.add_argument("--token", help="the swarm's token, for private swarms (or MODRON_SWARM_TOKEN)")
    j.add_argument("--port", type=int, default=0, help="port to listen on (default: any free port)")
    j.add_argument("--listen-ip", default="0.0.0.0")
    j.add_argument("--accept-download", action="append", metavar="ORG/NAME",
                   help="agree to download this hub model or tokenizer that an invite names (repeatable)")
    j.add_argument("--json", action="store_true", help="protocol events on stdout, controls on stdin")
    j.set_defaults(func=cmd_join)

    h = ss.add_parser("host", help="bootstrap and watch a swarm; keep its state as checkpoints")
    h.add_argument("--manifest", required=True)
    h.add_argument("--out", required=True, help="folder for invite.txt, identity.key and checkpoints")
    h.add_argument("--port", type=int, default=DEFAULT_HOST_PORT)
    h.add_argument("--listen-ip", default="0.0.0.0")
    h.add_argument("--announce-ip", help="the address peers should dial (e.g. your public IP)")
    h.add_argument("--minutes", type=float, help="stop after this many minutes")
    h.add_argument("--token", help="private swarms: the shared token (default: one is made, in OUT/token.txt)")
    h.add_argument("--checkpoint-minutes", type=float,
                   help="download the swarm's state and write a checkpoint this often (default: every 10 minutes "
                        "or less often, so that these downloads stay within 10 %% of what the swarm's rounds send)")
    h.add_argument("--threads", type=int, default=1)
    h.add_argument("--json", action="store_true")
    h.set_defaults(func=cmd_host)

    i = ss.add_parser("invite", help="print an invite for a manifest")
    i.add_argument("--manifest", required=True)
    i.add_argument("--peer", action="append", metavar="MADDR", help="an initial peer's multiaddr (repeatable)")
    i.set_defaults(func=cmd_invite)
    add_credential_parsers(ss, j)


def add_credential_parsers(ss, join) -> None:
    """`swarm credential issuer|issue|revoke`, and join's --credential and --print-peer-id (admission.py)."""
    join.add_argument("--credential", metavar="FILE",
                      help="private swarms: the credential the host issued to this peer (or MODRON_SWARM_CREDENTIAL)")
    join.add_argument("--print-peer-id", action="store_true",
                      help="print this install's peer id (what the host's `swarm credential issue --peer` needs) and exit")
    inner = join.get_default("func")
    join.set_defaults(func=lambda args: _join_admitted(inner, args))

    c = ss.add_parser("credential", help="private swarms: the host's issuer key and the peers' credentials")
    cs = c.add_subparsers(dest="credential_command", required=True, metavar="CREDENTIAL_COMMAND")
    k = cs.add_parser("issuer", help="print the issuer key for the manifest's auth.issuer (made in OUT if missing)")
    i = cs.add_parser("issue", help="print a credential (JSON) for one peer id")
    i.add_argument("--manifest", required=True)
    i.add_argument("--days", type=float, default=30.0, help="valid for this many days (default 30)")
    r = cs.add_parser("revoke", help="refuse one peer id from now on (the running host publishes it)")
    for p in (k, i, r):
        p.add_argument("--out", required=True, help="the host's OUT folder (holds swarm-issuer.key)")
        p.set_defaults(func=cmd_credential)
    for p in (i, r):
        p.add_argument("--peer", required=True, metavar="PEER_ID", help="the peer id (swarm join --print-peer-id)")


def _join_admitted(inner, args) -> int:
    if args.print_peer_id:
        try:
            from .admission import identity_peer_id
            from .network import identity_path_for
            from .peer import swarm_dir
            print(identity_peer_id(identity_path_for(swarm_dir(), args.device)))
        except UserError as exc:
            return _fail(None, exc)
        return 0
    if args.credential:     # read where the peer starts its DHT (peer.py), as MODRON_SWARM_TOKEN is
        os.environ["MODRON_SWARM_CREDENTIAL"] = str(Path(args.credential).resolve())
    return inner(args)


def cmd_credential(args) -> int:
    from . import admission
    out = Path(args.out)
    try:
        if args.credential_command == "issuer":
            print(admission.issuer_public(admission.load_issuer(out, create=True)))
            return 0
        key = admission.load_issuer(out)
        if args.credential_command == "revoke":
            admission.revoke(out, args.peer)
            sys.stderr.write(f"revoked {args.peer.strip()}: a running host refuses it within "
                             f"{admission.MAINTAIN_S:.0f} s, its peers soon after\n")
            return 0
        manifest = load_manifest(args.manifest)
        issuer = manifest.auth.get("issuer")
        if not manifest.auth.get("required"):
            raise ConfigError(args.manifest, "not a private swarm: set [auth] required = true")
        # an issuer that is not a key is replaced by ours when the host runs (admission.host_manifest)
        if admission.parse_issuer(issuer) is not None and issuer != admission.issuer_public(key):
            raise ConfigError(args.manifest, f"auth.issuer is not the key in {out}; it should be "
                                             f"\"{admission.issuer_public(key)}\"")
        print(admission.issue(key, manifest.run_id, args.peer, args.days).to_json())
        return 0
    except admission.AdmissionError as exc:
        return _fail(None, ConfigError("credential", str(exc)))
    except UserError as exc:
        return _fail(None, exc)
    except OSError as exc:      # OUT is a file, unwritable, ...
        return _fail(None, ConfigError(str(out), exc.strerror or str(exc)))
