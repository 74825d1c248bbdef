"""A small network lab for benchmarks: Linux network namespaces joined by veth pairs, shaped links,
a delaying router and a masquerading home router. Needs root, iproute2 (`ip`, `tc`) and Debian's
iptables.

Safety rules, enforced here rather than left to callers:
- every address is inside 198.18.0.0/15 (RFC 2544's benchmarking range), checked before use;
- every command runs inside a namespace this lab created (`ip -n NS`, `tc -n NS`, `ip netns exec
  NS`); nothing is done to the host's own interfaces, routes or iptables rules;
- leaf namespaces get a route to 198.18.0.0/15 only, never a default route, and the routers
  have nothing but their veths: there is no path out to the real network;
- `close()` (also run by `with`, at exit, and on SIGTERM/SIGINT through the caller's handler)
  kills what still runs inside the namespaces and deletes them, which removes their veths.

Kernels without `netem` (this lab's target machine has only tbf, htb, u32, bpf) still get a delay:
the core router queues forwarded packets to user space through NFQUEUE and releases them, in
order, `delay` later (the `delay` command below, a few hundred lines of netlink instead of a
library). Loss is iptables' `statistic` match, rate is `tbf`.

    python bench/_netlab.py cleanup      # remove namespaces left by a lab whose process was killed
"""
from __future__ import annotations

import collections
import ipaddress
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "mwan-"                        # every namespace this lab makes is named mwan-<pid>-<role>
BENCH_NET = ipaddress.ip_network("198.18.0.0/15")
INSTALL_HINT = "apt-get install -y iproute2 iptables"


class LabError(RuntimeError):
    pass


def _check_addr(addr: str) -> str:
    ip = ipaddress.ip_interface(addr).ip if "/" in addr else ipaddress.ip_address(addr)
    if ip not in BENCH_NET:
        raise LabError(f"{addr} is outside 198.18.0.0/15; this lab uses benchmarking addresses only")
    return addr


def missing_requirements() -> list[str]:
    """Plain-language problems that stop the lab from running (empty: good to go)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root (network namespaces, veths, tc and iptables): run it with sudo, e.g. "
                        "`sudo .venv/bin/python bench/swarm_wan.py`")
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("iptables", "iptables")):
        if not any(os.access(os.path.join(d, tool), os.X_OK)
                   for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/sbin"]):
            problems.append(f"`{tool}` is missing: install it with `apt-get install -y {package}` "
                            f"(Debian/Ubuntu)")
    return problems


def _run(argv: list[str], check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()[:400]}")
    return proc


def _tool(name: str) -> str:
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/sbin"]:
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    raise LabError(f"`{name}` is missing; install it with `{INSTALL_HINT}`")


@dataclass
class Shaping:
    """One access link: rates in bit/s (None: unlimited) and the queue a home router keeps."""
    up_bps: float | None = None
    down_bps: float | None = None
    queue_ms: float = 100.0            # tbf's latency bound: the queue drains in this many ms

    def tbf_args(self, rate_bps: float) -> list[str]:
        rate = int(rate_bps)
        # Bucket: at least two full frames, or 5 ms of traffic at the rate.
        burst = max(3200, int(rate / 8 * 0.005))
        return ["tbf", "rate", f"{rate}bit", "burst", str(burst), "latency", f"{int(self.queue_ms)}ms"]


@dataclass
class Node:
    role: str                          # "host", "peer1", "natgw", ...
    ns: str                            # the namespace's name
    ip: str = ""                       # its address on the bench network
    iface: str = "wan"                 # the interface whose counters are its traffic
    extra: dict = field(default_factory=dict)


class NetLab:
    """A core router namespace (delay and loss for every packet it forwards) with access links to
    leaf namespaces. Use as a context manager; `close()` tears everything down."""

    def __init__(self, tag: str | None = None):
        self.tag = tag or str(os.getpid())
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.nodes: dict[str, Node] = {}
        self._links = 0
        self.delayer: subprocess.Popen | None = None
        self.delay_ms = 0.0
        self.closed = False
        try:
            self.core = self._add_ns("core")
            self._sysctl(self.core, "net.ipv4.ip_forward", "1")
        except BaseException:
            self.close()
            raise

    # ---- context ---------------------------------------------------------------------------
    def __enter__(self) -> "NetLab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- building blocks -------------------------------------------------------------------
    def _add_ns(self, role: str) -> str:
        name = f"{PREFIX}{self.tag}-{role}"
        _run([_tool("ip"), "netns", "add", name])
        self.namespaces.append(name)
        _run([_tool("ip"), "-n", name, "link", "set", "lo", "up"])
        # No IPv6: its router solicitations and MLD reports would add noise to the byte counts.
        for key in ("net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"):
            self._sysctl(name, key, "1", check=False)
        return name

    def _sysctl(self, ns: str, key: str, value: str, check: bool = True) -> None:
        _run([_tool("ip"), "netns", "exec", ns, _tool("sysctl"), "-qw", f"{key}={value}"], check=check)

    def ip(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run([_tool("ip"), "-n", ns, *args], check=check)

    def tc(self, ns: str, *args: str) -> None:
        _run([_tool("tc"), "-n", ns, *args])

    def iptables(self, ns: str, *args: str) -> None:
        _run([_tool("ip"), "netns", "exec", ns, _tool("iptables"), "-w", *args])

    def _veth(self, ns_a: str, if_a: str, addr_a: str, ns_b: str, if_b: str, addr_b: str) -> None:
        for a in (addr_a, addr_b):
            _check_addr(a)
        self.ip(ns_a, "link", "add", "name", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
        # One wire packet per skb: no 64 KB GSO bursts, so the byte counters count every frame's
        # headers, tbf shapes packets, and the loss rule drops packets, as on a real link.
        for ns, iface in ((ns_a, if_a), (ns_b, if_b)):
            self.ip(ns, "link", "set", "dev", iface, "gso_max_segs", "1", "gso_max_size", "1500")
        self.ip(ns_a, "addr", "add", addr_a, "dev", if_a)
        self.ip(ns_b, "addr", "add", addr_b, "dev", if_b)
        self.ip(ns_a, "link", "set", if_a, "up")
        self.ip(ns_b, "link", "set", if_b, "up")

    def _shape(self, ns: str, iface: str, rate_bps: float | None, shaping: Shaping) -> None:
        if rate_bps:
            self.tc(ns, "qdisc", "replace", "dev", iface, "root", *shaping.tbf_args(rate_bps))

    def reshape(self, role: str, shaping: Shaping) -> None:
        """Change (or lift, with rates None) a leaf's access-link rates while traffic flows."""
        node = self.nodes[role]
        for ns, iface, rate in ((node.extra["up_ns"], node.extra["up_if"], shaping.up_bps),
                                (self.core, node.extra["core_if"], shaping.down_bps)):
            if rate:
                self.tc(ns, "qdisc", "replace", "dev", iface, "root", *shaping.tbf_args(rate))
            else:
                _run([_tool("tc"), "-n", ns, "qdisc", "del", "dev", iface, "root"], check=False)

    def add_leaf(self, role: str, shaping: Shaping) -> Node:
        """A namespace with one access link to the core: 198.18.K.2, its router 198.18.K.1."""
        self._links += 1
        k = self._links
        if k > 250:
            raise LabError("too many links")
        ns = self._add_ns(role)
        core_if = f"l{k}"
        self._veth(self.core, core_if, f"198.18.{k}.1/24", ns, "wan", f"198.18.{k}.2/24")
        self.ip(ns, "route", "add", str(BENCH_NET), "via", f"198.18.{k}.1")
        node = Node(role, ns, f"198.18.{k}.2", "wan",
                    extra={"core_if": core_if, "up_ns": ns, "up_if": "wan"})
        self.nodes[role] = node
        self._shape(ns, "wan", shaping.up_bps, shaping)
        self._shape(self.core, core_if, shaping.down_bps, shaping)
        return node

    def add_nat_leaf(self, role: str, shaping: Shaping) -> Node:
        """A namespace behind a home router: the router (`ROLE-gw`) has the access link and
        masquerades the LAN 198.19.K.0/24 behind its own address, and lets in only replies (no
        port forwarding), as home routers do. The core has no route to the LAN."""
        gw = self.add_leaf(f"{role}gw", shaping)
        self._sysctl(gw.ns, "net.ipv4.ip_forward", "1")
        k = self._links
        ns = self._add_ns(role)
        lan_gw, lan_ip = f"198.19.{k}.1", f"198.19.{k}.2"
        self._veth(gw.ns, "lan", f"{lan_gw}/24", ns, "wan", f"{lan_ip}/24")
        self.ip(ns, "route", "add", str(BENCH_NET), "via", lan_gw)
        self.iptables(gw.ns, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-s", f"198.19.{k}.0/24",
                      "-j", "MASQUERADE")
        self.iptables(gw.ns, "-A", "FORWARD", "-i", "wan", "-o", "lan", "-m", "conntrack", "--ctstate",
                      "ESTABLISHED,RELATED", "-j", "ACCEPT")
        self.iptables(gw.ns, "-A", "FORWARD", "-i", "wan", "-o", "lan", "-j", "DROP")
        node = Node(role, ns, lan_ip, "wan", extra={"gateway": gw.role, "public_ip": gw.ip,
                                                    "core_if": gw.extra["core_if"], "up_ns": gw.ns, "up_if": "wan"})
        self.nodes[role] = node
        return node

    def impair(self, delay_ms: float, loss: float) -> None:
        """Every packet the core forwards: dropped with probability `loss`, else held `delay_ms`.
        A path between two leaves crosses the core once each way: RTT = 2 x delay_ms. Callable
        again to change or lift (0, 0) the impairment."""
        self.iptables(self.core, "-F", "FORWARD")
        if loss > 0:
            self.iptables(self.core, "-A", "FORWARD", "-m", "statistic", "--mode", "random",
                          "--probability", f"{loss:.6f}", "-j", "DROP")
        if delay_ms <= 0:
            return
        if self.delayer is not None and self.delay_ms != delay_ms:
            self.delayer.terminate()
            self.delayer.wait(5)
            self.delayer = None
        if self.delayer is None:
            self.delayer = self.popen(self.core, [sys.executable, str(Path(__file__).resolve()), "delay",
                                                  "--queue", "0", "--delay-ms", str(delay_ms)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.delay_ms = delay_ms
            line = self.delayer.stdout.readline()
            if not line.startswith("ready"):
                raise LabError(f"the delaying router did not start: {line.strip()} "
                               f"{self.delayer.stderr.read()[:400] if self.delayer.poll() is not None else ''}")
        # No --queue-bypass: if the delayer dies, traffic stops instead of silently going undelayed.
        self.iptables(self.core, "-A", "FORWARD", "-j", "NFQUEUE", "--queue-num", "0")

    def delayer_alive(self) -> bool:
        return self.delayer is None or self.delayer.poll() is None

    # ---- processes and counters ------------------------------------------------------------
    def popen(self, ns: str, argv: list[str], **kwargs) -> subprocess.Popen:
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen([_tool("ip"), "netns", "exec", ns, *argv], **kwargs)
        self.procs.append(proc)
        return proc

    def exec_argv(self, ns: str) -> list[str]:
        """The prefix that runs a command inside `ns` (for callers with their own Popen wrapper)."""
        return [_tool("ip"), "netns", "exec", ns]

    def counters(self, role: str) -> tuple[int, int]:
        """(tx_bytes, rx_bytes) of a node's interface, from the kernel's counters."""
        node = self.nodes[role]
        out = self.ip(node.ns, "-j", "-s", "link", "show", "dev", node.iface).stdout
        stats = json.loads(out)[0]["stats64"]
        return int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])

    def probe_rtt(self, src: str, dst: str, port: int = 9, count: int = 5) -> float:
        """Median seconds for a TCP connect from `src` to a closed port of `dst`: SYN out, RST back,
        one round trip through the links."""
        ip = self.nodes[dst].ip
        code = ("import socket,time,statistics,sys\nts=[]\n"
                f"for _ in range({count}):\n"
                " s=socket.socket(); s.settimeout(5); t=time.perf_counter()\n"
                f" try: s.connect(('{ip}',{port}))\n"
                " except OSError: pass\n"
                " ts.append(time.perf_counter()-t); s.close(); time.sleep(0.05)\n"
                "print(statistics.median(ts))")
        out = _run([_tool("ip"), "netns", "exec", self.nodes[src].ns, sys.executable, "-c", code]).stdout
        return float(out.strip())

    def probe_rate(self, src: str, dst: str, seconds: float = 2.0, port: int = 5001) -> float:
        """Bits/s of one TCP stream from `src` to `dst` over `seconds` (after a short ramp-up)."""
        ip = self.nodes[dst].ip
        server = ("import socket,time\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
                  f"s.bind(('{ip}',{port})); s.listen(1); print('up',flush=True); c,_=s.accept()\n"
                  f"n=0; t0=None; end=None\n"
                  "while True:\n"
                  " b=c.recv(65536)\n"
                  " if not b: break\n"
                  " now=time.perf_counter()\n"
                  " if t0 is None and n>=16384: t0=now; n0=n\n"
                  " n+=len(b); end=now\n"
                  "print((n-n0)*8/(end-t0) if t0 and end>t0 else 0.0)")
        srv = self.popen(self.nodes[dst].ns, [sys.executable, "-c", server], stdout=subprocess.PIPE, text=True)
        try:
            srv.stdout.readline()
            client = ("import socket,time\n"
                      f"c=socket.create_connection(('{ip}',{port}),timeout=10); buf=b'x'*16384\n"
                      f"end=time.perf_counter()+{seconds}\n"
                      "while time.perf_counter()<end: c.sendall(buf)\n"
                      "c.close()")
            _run([_tool("ip"), "netns", "exec", self.nodes[src].ns, sys.executable, "-c", client])
            out, _ = srv.communicate(timeout=seconds + 30)
            return float(out.strip() or 0.0)
        finally:
            if srv.poll() is None:
                srv.kill()

    # ---- teardown --------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for name in reversed(self.namespaces):
            remove_namespace(name)
        self.namespaces.clear()


def remove_namespace(name: str) -> None:
    """Kill what still runs inside one of this lab's namespaces, then delete it (its veths go too)."""
    if not name.startswith(PREFIX):
        raise LabError(f"refusing to remove {name!r}: not a namespace this lab made")
    pids = _run([_tool("ip"), "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        pids = _run([_tool("ip"), "netns", "pids", name], check=False).stdout.split()
        if pids:
            time.sleep(0.1)
    _run([_tool("ip"), "netns", "del", name], check=False)


def leftover_namespaces(live_only_dead: bool = True) -> list[str]:
    """Namespaces named by this lab whose creating process is gone (all of them: live_only_dead=False)."""
    out = _run([_tool("ip"), "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]
    found = []
    for name in names:
        tag = name[len(PREFIX):].split("-", 1)[0]
        alive = tag.isdigit() and Path(f"/proc/{tag}").exists()
        if not (live_only_dead and alive):
            found.append(name)
    return found


# ---- the delaying router: NFQUEUE over raw netlink ------------------------------------------

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NF_ACCEPT = 1
SOL_NETLINK, NETLINK_NO_ENOBUFS = 270, 5


def _nlattr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _nfq_msg(msg: int, flags: int, seq: int, queue: int, attrs: bytes) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg, flags, seq, 0) + body


def _packet_ids(data: bytes):
    """Packet ids in a buffer of netlink messages; raises on a netlink error."""
    off = 0
    while off + 16 <= len(data):
        length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, off)
        if length < 16:
            break
        if kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", data, off + 16)
            if err:
                raise OSError(-err, os.strerror(-err))
        elif kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            a = off + 20
            end = off + length
            while a + 4 <= end:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if (atype & 0x7FFF) == NFQA_PACKET_HDR:
                    yield struct.unpack_from("!I", data, a + 4)[0]
                    break
                a += (alen + 3) & ~3
        off += (length + 3) & ~3


def run_delayer(queue: int, delay_s: float) -> None:
    """Hold each packet of NFQUEUE `queue` for `delay_s`, then accept it. One fixed delay keeps
    packets in order, so one batch verdict ("accept every id up to N") releases all that are due;
    a notification lost to a full socket buffer is released by the next batch all the same."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)   # SO_RCVBUFFORCE (root)
        sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
    except OSError:
        pass
    seq = 0

    def request(msg: int, attrs: bytes) -> None:
        nonlocal seq
        seq += 1
        sock.send(_nfq_msg(msg, NLM_F_REQUEST | NLM_F_ACK, seq, queue, attrs))
        list(_packet_ids(sock.recv(65536)))   # the ack; raises on error

    request(NFQNL_MSG_CONFIG, _nlattr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET)))
    request(NFQNL_MSG_CONFIG, _nlattr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
            + _nlattr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", 1 << 16)))
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    try:
        os.nice(-5)   # a late release is extra delay: keep ahead of the training processes
    except OSError:
        pass
    print("ready", flush=True)
    sock.setblocking(False)
    pending: collections.deque = collections.deque()
    released = 0
    while not stop:
        now = time.monotonic()
        timeout = max(0.0, pending[0][0] - now) if pending else 0.5
        try:
            ready, _, _ = select.select([sock], [], [], timeout)
        except InterruptedError:
            continue
        if ready:
            while True:
                try:
                    data = sock.recv(1 << 16)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:   # ENOBUFS despite the option: the next batch verdict covers it
                    break
                due = time.monotonic() + delay_s
                for pid in _packet_ids(data):
                    pending.append((due, pid))
        now = time.monotonic()
        last = None
        while pending and pending[0][0] <= now:
            last = pending.popleft()[1]
            released += 1
        if last is not None:
            seq += 1
            verdict = _nlattr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, last))
            try:
                sock.send(_nfq_msg(NFQNL_MSG_VERDICT_BATCH, NLM_F_REQUEST, seq, queue, verdict))
            except BlockingIOError:
                time.sleep(0.001)
    print(json.dumps({"released": released}), flush=True)


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("delay", help="(internal) the delaying router's NFQUEUE loop")
    d.add_argument("--queue", type=int, default=0)
    d.add_argument("--delay-ms", type=float, required=True)
    sub.add_parser("cleanup", help="remove namespaces left behind by a lab whose process died")
    args = ap.parse_args(argv)
    if args.cmd == "delay":
        run_delayer(args.queue, args.delay_ms / 1000.0)
        return 0
    if os.geteuid() != 0:
        print("cleanup needs root", file=sys.stderr)
        return 2
    for name in leftover_namespaces():
        remove_namespace(name)
        print(f"removed {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
