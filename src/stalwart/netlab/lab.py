"""An emulated cluster in Linux network namespaces, with a shallow-buffered bottleneck.

One namespace per server and per worker, each with a veth pair to a bridge in the
launcher's namespace (which holds the bridge's address, so the driver and the
coordinator run there). The bridge-side end of each server's link gets a ``tbf``
qdisc: a token bucket at ``rate_mbit`` with a queue of ``buffer_kb``, which is the
switch port towards the server that many workers' pushes cross at once (incast). A
packet that finds the queue full is dropped, as a shallow switch buffer drops it.

:class:`NetLab` is a context manager that always tears down what it built: on a normal
exit, on an exception, on Ctrl-C, and at interpreter exit. Names carry a random
prefix, and the subnet is one not in use on this host, so two labs (or a lab and the
host's own networks) never collide; only addresses inside that subnet are ever used.
Needs root (CAP_NET_ADMIN) and iproute2.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field

PREFIX = "stw"


class NetLabError(RuntimeError):
    """The lab cannot be built here; the message says why."""


def unavailable_reason() -> str | None:
    """Why a lab cannot be built on this machine, or None if it can."""
    if os.geteuid() != 0:
        return "netlab needs root (network namespaces, veth pairs, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"netlab needs iproute2's {tool!r}, which is not installed"
    probe = f"{PREFIX}probe{secrets.token_hex(2)}"
    try:
        _run("ip", "netns", "add", probe)
    except NetLabError as exc:
        return f"cannot create a network namespace here: {exc}"
    _run("ip", "netns", "del", probe, check=False)
    return None


def _run(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetLabError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _free_subnet() -> ipaddress.IPv4Network:
    used = [ipaddress.ip_interface(a).network for a in re.findall(r"inet (\S+)", _run("ip", "-4", "addr"))]
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{secrets.randbelow(200) + 50}.{secrets.randbelow(256)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetLabError("found no free 10.x.y.0/24 subnet for the lab")


@dataclass
class Host:
    role: str
    index: int
    netns: str
    address: str
    link: str  # the bridge-side veth end


@dataclass
class NetLab:
    workers: int
    servers: int = 1
    rate_mbit: float = 1000.0
    buffer_kb: float = 64.0
    mtu: int = 1500
    hosts: list[Host] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= 100 or not 1 <= self.servers <= 50:
            raise ValueError(f"netlab holds 1-100 workers and 1-50 servers, not {self.workers} and {self.servers}")
        if self.rate_mbit <= 0 or self.buffer_kb <= 0:
            raise ValueError("netlab rate_mbit and buffer_kb must be positive")
        self.tag = secrets.token_hex(2)
        self.bridge = f"{PREFIX}{self.tag}br"
        self.subnet: ipaddress.IPv4Network | None = None
        self.bridge_address = ""
        self._built: list[tuple[str, ...]] = []  # undo commands, run in reverse

    # --- building ------------------------------------------------------------------
    def __enter__(self) -> "NetLab":
        reason = unavailable_reason()
        if reason is not None:
            raise NetLabError(reason)
        atexit.register(self.teardown)
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def _step(self, do: tuple[str, ...], undo: tuple[str, ...] | None) -> None:
        _run(*do)
        if undo is not None:
            self._built.append(undo)

    def _build(self) -> None:
        self.subnet = _free_subnet()
        addresses = self.subnet.hosts()
        self.bridge_address = str(next(addresses))
        prefix = self.subnet.prefixlen
        self._step(("ip", "link", "add", self.bridge, "type", "bridge"), ("ip", "link", "del", self.bridge))
        self._step(("ip", "addr", "add", f"{self.bridge_address}/{prefix}", "dev", self.bridge), None)
        self._step(("ip", "link", "set", self.bridge, "mtu", str(self.mtu), "up"), None)
        roles = [("server", i) for i in range(self.servers)] + [("worker", i) for i in range(self.workers)]
        for role, index in roles:
            short = f"{role[0]}{index}"
            netns, link = f"{PREFIX}{self.tag}{short}", f"{PREFIX}{self.tag}{short}"
            address = str(next(addresses))
            self._step(("ip", "netns", "add", netns), ("ip", "netns", "del", netns))
            self._step(("ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns),
                       ("ip", "link", "del", link))
            self._step(("ip", "link", "set", link, "master", self.bridge, "mtu", str(self.mtu), "up"), None)
            ns = ("ip", "-n", netns)
            self._step((*ns, "addr", "add", f"{address}/{prefix}", "dev", "eth0"), None)
            self._step((*ns, "link", "set", "eth0", "mtu", str(self.mtu), "up"), None)
            self._step((*ns, "link", "set", "lo", "up"), None)
            if role == "server":
                self._shape(link)
            self.hosts.append(Host(role, index, netns, address, link))

    def _shape(self, link: str) -> None:
        """The bottleneck: what leaves the bridge towards a server passes a token bucket
        with a queue of buffer_kb (its burst is half a millisecond of the rate, at least
        two packets, so the queue and not the bucket decides what is dropped)."""
        burst = max(2 * self.mtu, int(self.rate_mbit * 125_000 * 0.0005))
        self._step(("tc", "qdisc", "add", "dev", link, "root", "tbf", "rate", f"{self.rate_mbit}mbit",
                    "burst", str(burst), "limit", str(int(self.buffer_kb * 1024))), None)

    def teardown(self) -> None:
        """Remove everything built, newest first; safe to call twice."""
        while self._built:
            _run(*self._built.pop(), check=False)
        atexit.unregister(self.teardown)

    # --- using ---------------------------------------------------------------------
    def host(self, role: str, index: int) -> Host:
        for h in self.hosts:
            if h.role == role and h.index == index:
                return h
        raise KeyError(f"netlab has no {role} {index}")

    def placement(self) -> dict[str, dict]:
        """Where a launcher puts each role: ``{"worker:3": {"netns": ..., "host": ...}}``."""
        return {f"{h.role}:{h.index}": {"netns": h.netns, "host": h.address} for h in self.hosts}

    def bottleneck_stats(self) -> dict[str, int]:
        """Bytes and packets sent, packets dropped at the server links' queues (summed)."""
        totals = {"sent_bytes": 0, "sent_packets": 0, "dropped": 0, "overlimits": 0}
        for h in self.hosts:
            if h.role != "server":
                continue
            out = _run("tc", "-s", "qdisc", "show", "dev", h.link)
            m = re.search(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+)", out)
            if m:
                for key, value in zip(totals, map(int, m.groups())):
                    totals[key] += value
        return totals


def cleanup_leftovers() -> list[str]:
    """Delete every namespace and link a crashed lab left behind (names start with the prefix)."""
    removed = []
    for name in _run("ip", "netns", "list", check=False).split():
        if name.startswith(PREFIX) and re.fullmatch(rf"{PREFIX}[0-9a-f]{{4}}[sw]\d+", name):
            _run("ip", "netns", "del", name, check=False)
            removed.append(name)
    for name in re.findall(rf"\d+: ({PREFIX}[0-9a-f]{{4}}(?:br|[sw]\d+))[@:]", _run("ip", "-o", "link", check=False)):
        _run("ip", "link", "del", name, check=False)
        removed.append(name)
    return removed
