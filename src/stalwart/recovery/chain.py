"""Chain replication of one shard: K server processes, updates flowing head to tail.

Every replica is the same deterministic state machine (sync policy + optimizer over
the shard), fed the same ordered log of entries: a worker's push, its first offer of
parameters (``init``), its departure (``leave``). The head gives each entry the next
log sequence number (lsn) and the wall time at which it happened (so that timing-based
policies decide identically everywhere), applies it, and sends it on; every replica
applies what it receives, in lsn order, and sends it on to its own successor.

**Strong mode.** An entry is acknowledged upstream only once the tail has applied it:
the tail acks at once, a middle replica when its successor has acked, and the head
answers the worker then. So an update a worker saw acknowledged is held by every
replica of the chain, and losing any one replica loses none of them. Workers pull
from the tail. Each replica keeps the entries it sent but has not had acknowledged;
when its successor dies it reconnects to the next one and resends them, and the
receiver drops what it already has (lsn at or below its own). A worker whose head
died resends its unacknowledged push to the new head, which recognizes it by
(worker, push sequence) and acknowledges it without applying it twice.

**Relaxed mode** (as the paper did). The head acknowledges a push as soon as it has
applied it and sends its whole state down the chain every ``every_updates`` updates;
a failover loses the updates since the last state sent.

**Repair.** A replica that loses its successor reports it to the coordinator, which
confirms the death by probing and bumps the chain's epoch; the replica then reads the
new chain and connects to its new successor (or, if it is now the tail, acknowledges
everything it holds). A restarted process joins at the tail: it asks the tail for a
state transfer, the tail sends its state and from then on forwards every entry to it,
and once installed it tells the coordinator, which appends it to the chain.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..control import CoordinatorClient, CoordinatorError
from ..transport import Connection, ConnectionClosed, Frame, Kind, ProtocolError, dial

if TYPE_CHECKING:
    from ..server.server import ParameterServer

REPAIR_POLL_S = 0.1


# --- whole-state transfer ---------------------------------------------------------------

def to_plain(value: Any, arrays: list[np.ndarray]) -> Any:
    """Policy state as msgpack-able data; arrays go to ``arrays`` and are referenced by index."""
    if isinstance(value, np.ndarray):
        arrays.append(value)
        return {"__nd__": len(arrays) - 1}
    if isinstance(value, (set, frozenset)):
        return {"__set__": [to_plain(v, arrays) for v in sorted(value)]}
    if isinstance(value, dict):
        return {"__map__": [[to_plain(k, arrays), to_plain(v, arrays)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [to_plain(v, arrays) for v in value]}
    if isinstance(value, list):
        return [to_plain(v, arrays) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def from_plain(value: Any, arrays: list[np.ndarray]) -> Any:
    if isinstance(value, dict):
        if "__nd__" in value:
            return arrays[value["__nd__"]].copy()
        if "__set__" in value:
            return {from_plain(v, arrays) for v in value["__set__"]}
        if "__tuple__" in value:
            return tuple(from_plain(v, arrays) for v in value["__tuple__"])
        if "__map__" in value:
            return {from_plain(k, arrays): from_plain(v, arrays) for k, v in value["__map__"]}
    if isinstance(value, list):
        return [from_plain(v, arrays) for v in value]
    return value


def state_frame(server: "ParameterServer", lsn: int, dedupe: dict) -> tuple[Frame, bytes]:
    """The server's whole state as one STATE frame; the caller holds its state lock."""
    arrays: list[np.ndarray] = []
    opt_arrays, opt_scalars = server.optimizer_state()
    meta = {
        "shard": server.shard, "version": server.version, "lsn": lsn, "initialized": server.initialized,
        "params": to_plain(server.params, arrays),
        "optimizer": to_plain(opt_arrays, arrays), "optimizer_scalars": opt_scalars,
        "policy": to_plain({k: v for k, v in vars(server.policy).items() if not k.startswith("_events")}, arrays),
        "dedupe": to_plain(dedupe, arrays),
        "arrays": [[str(a.dtype), list(a.shape)] for a in arrays],
    }
    payload = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    return Frame(Kind.STATE, shard=server.shard, seq=lsn, meta=meta), payload


def install_state(server: "ParameterServer", meta: dict, payload: memoryview) -> tuple[int, dict]:
    """Install a STATE frame into ``server`` (caller holds its state lock): (lsn, dedupe)."""
    if meta.get("shard") != server.shard:
        raise ProtocolError(f"state for shard {meta.get('shard')} sent to shard {server.shard}")
    arrays, offset = [], 0
    for dtype, shape in meta["arrays"]:
        a = np.frombuffer(payload, dtype=np.dtype(dtype), count=int(np.prod(shape)), offset=offset)
        arrays.append(a.reshape(shape))
        offset += a.nbytes
    if offset != len(payload):
        raise ProtocolError(f"state payload of {len(payload)} bytes, arrays of {offset}")
    params = from_plain(meta["params"], arrays)
    if params.shape != server.params.shape:
        raise ProtocolError(f"state holds {params.shape} parameters, the shard {server.params.shape}")
    server.install(params, from_plain(meta["optimizer"], arrays), meta["optimizer_scalars"],
                   meta["version"], meta["initialized"])
    for k, v in from_plain(meta["policy"], arrays).items():
        setattr(server.policy, k, v)
    return int(meta["lsn"]), from_plain(meta["dedupe"], arrays)


# --- the log ---------------------------------------------------------------------------

@dataclass
class Entry:
    lsn: int
    frame: Frame                      # REPLICATE frame as sent downstream
    payload: bytes | None
    waiters: list[Callable[[], None]] = field(default_factory=list)  # run once durable


@dataclass
class Link:
    """Our connection to our successor; ``broken`` once a send or a read on it failed."""
    index: int
    conn: Connection
    broken: bool = False


class ChainReplica:
    """One replica's part in its shard's chain; the server calls in, threads send out."""

    def __init__(self, server: "ParameterServer", index: int, control: CoordinatorClient, token: bytes,
                 transport: str, mode: str = "strong", every_updates: int = 100):
        self.server, self.index, self.control = server, index, control
        self.token, self.transport, self.mode, self.every_updates = token, transport, mode, every_updates
        self.shard = server.shard
        self.last_lsn = 0
        self.dedupe: dict[int, list] = {}     # worker -> [push seq, lsn, version after it]
        self.outbox: deque[Entry] = deque()   # applied here, not yet acked by the successor
        self.members: list[list] = []         # the chain as last read: [[index, address], ...]
        self.successor: Link | None = None
        self._sent_upto = 0
        self._cond = threading.Condition()    # guards outbox, successor, _sent_upto
        self._wake = threading.Event()
        self._closed = False
        self._last_state_version = 0

    # --- position in the chain ------------------------------------------------------
    def refresh(self) -> None:
        try:
            self.members = self.control.call("chain", shard=self.shard)["members"]
        except CoordinatorError:
            pass

    def position(self) -> tuple[int | None, list | None]:
        """(my place, my successor [index, address]) in the chain as last read."""
        indices = [m[0] for m in self.members]
        if self.index not in indices:
            return None, None
        at = indices.index(self.index)
        return at, (self.members[at + 1] if at + 1 < len(self.members) else None)

    def is_head(self) -> bool:
        at, _ = self.position()
        if at != 0:
            self.refresh()  # a worker came to us: perhaps the head died and we lead now
            at, _ = self.position()
            if at == 0:
                self._changed("became_head")
        return at == 0

    # --- entries --------------------------------------------------------------------
    def append(self, frame: Frame, payload: bytes | None, waiter: Callable[[], None] | None) -> None:
        """Queue an entry the server just applied (it holds its state lock)."""
        if self.mode == "strong" and self.successor is None:
            # No link yet: are we the tail, or is our successor's link still being made?
            self.refresh()
            if self.position()[1] is not None:
                self._wake.set()
                with self._cond:
                    self.outbox.append(Entry(frame.seq, frame, payload, [waiter] if waiter else []))
                return
        with self._cond:
            if self.mode == "strong" and self.successor is not None:
                self.outbox.append(Entry(frame.seq, frame, payload, [waiter] if waiter else []))
                self._cond.notify_all()
                return
        if waiter is not None:
            waiter()  # the tail (or relaxed mode): applied here is acknowledged

    def wait_durable(self, lsn: int, waiter: Callable[[], None]) -> None:
        """Run ``waiter`` once entry ``lsn`` (already applied) is acknowledged."""
        with self._cond:
            for entry in self.outbox:
                if entry.lsn == lsn:
                    entry.waiters.append(waiter)
                    return
        waiter()  # not pending: already durable

    def on_ack(self, lsn: int) -> None:
        fire = []
        with self._cond:
            while self.outbox and self.outbox[0].lsn <= lsn:
                fire += self.outbox.popleft().waiters
        for w in fire:
            w()

    def maybe_send_state(self) -> None:
        """Relaxed mode, at the head (holding the state lock): the whole state every
        ``every_updates`` updates."""
        if self.mode != "relaxed" or self.server.version - self._last_state_version < self.every_updates:
            return
        self._last_state_version = self.server.version
        frame, payload = state_frame(self.server, self.last_lsn, self.dedupe)
        self.forward_state(frame, payload)

    def forward_state(self, frame: Frame, payload: bytes) -> None:
        """Send a whole state on down the chain (relaxed mode)."""
        with self._cond:
            link = self.successor
        if link is not None and self.mode == "relaxed":
            try:
                link.conn.send(frame, payload)
            except (ConnectionError, OSError):
                self._broken(link)

    # --- successor management -----------------------------------------------------------
    def start(self) -> None:
        threading.Thread(target=self._maintain, name="chain-maintain", daemon=True).start()
        threading.Thread(target=self._sender, name="chain-send", daemon=True).start()

    def can_adopt(self) -> str | None:
        """Why a joiner cannot attach behind us now (None: it can)."""
        self.refresh()
        at, successor = self.position()
        if at is None or successor is not None:
            return f"server {self.index} is not the tail of shard {self.shard}'s chain"
        with self._cond:
            if self.successor is not None and not self.successor.broken:
                return f"server {self.index} is already handing its state to another replica"
        return None

    def adopt_joiner(self, index: int, conn: Connection) -> None:
        """A new replica asked for our state (we are the tail): it becomes our successor."""
        with self.server._state:
            frame, payload = state_frame(self.server, self.last_lsn, self.dedupe)
            conn.send(frame, payload)
            with self._cond:
                self._set_successor(Link(index, conn))
        self.server.log.emit("chain_joiner_adopted", shard=self.shard, joiner=index, lsn=self.last_lsn)

    def successor_lost(self, conn: Connection) -> None:
        with self._cond:
            link = self.successor
        if link is not None and link.conn is conn:
            self._broken(link)

    def _broken(self, link: Link) -> None:
        link.broken = True
        link.conn.close()
        self._wake.set()

    def _set_successor(self, link: Link | None) -> None:
        """Caller holds _cond. Everything not yet acked is (re)sent to the new successor;
        with none, we are the tail and everything we hold is durable."""
        old, self.successor = self.successor, link
        self._sent_upto = self.outbox[0].lsn - 1 if self.outbox else self.last_lsn
        if old is not None and (link is None or old.conn is not link.conn):
            old.conn.close()
        fire = []
        if link is None:
            fire = [w for e in self.outbox for w in e.waiters]
            self.outbox.clear()
        self._cond.notify_all()
        for w in fire:
            w()

    def _maintain(self) -> None:
        """Keep our successor link matching the chain; repair it when it breaks."""
        seen_epoch = -1
        while not self._closed:
            woke = self._wake.wait(REPAIR_POLL_S)
            self._wake.clear()
            if self._closed:
                return
            if not woke and self.control.epoch == seen_epoch:
                continue
            seen_epoch = self.control.epoch
            with self._cond:
                link = self.successor
            if link is not None and link.broken:
                try:
                    self.control.call("suspect", index=link.index, reporter=f"server {self.index}")
                except CoordinatorError:
                    pass
            self.refresh()
            at, wanted = self.position()
            if at is None:
                continue  # not in the chain: removed, or a joiner not yet appended
            if wanted is None:
                # We are the tail. A joiner not yet appended stays our successor while alive.
                joiner = link is not None and not link.broken and link.index not in [m[0] for m in self.members]
                if link is not None and not joiner:
                    with self._cond:
                        self._set_successor(None)
                    self._changed("became_tail")
                continue
            if link is not None and link.index == wanted[0] and not link.broken:
                continue
            try:
                conn = dial(wanted[1], self.token, self.transport, timeout=2.0,
                            max_payload=self.server.max_payload)
            except (OSError, ProtocolError, ConnectionError):
                self._wake.set()  # not up yet, or dead and about to be removed: try again
                time.sleep(0.02)  # back off a little before the retry
                continue
            new = Link(wanted[0], conn)
            with self._cond:
                self._set_successor(new)
            threading.Thread(target=self._ack_reader, args=(new,), daemon=True, name="chain-acks").start()
            self._changed("new_successor")
            if self.mode == "relaxed":
                with self.server._state:
                    frame, payload = state_frame(self.server, self.last_lsn, self.dedupe)
                self.forward_state(frame, payload)  # the new successor starts from our state

    def _changed(self, why: str) -> None:
        with self.server._state:
            self.server._resume_reason = self.server._resume_reason or why
        self.server.log.emit("chain_changed", shard=self.shard, why=why,
                             chain=[m[0] for m in self.members], epoch=self.control.epoch)

    def _sender(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not (self.successor is not None and not self.successor.broken
                                                 and self.outbox and self.outbox[-1].lsn > self._sent_upto):
                    self._cond.wait()
                if self._closed:
                    return
                link = self.successor
                batch = [e for e in self.outbox if e.lsn > self._sent_upto]
                self._sent_upto = batch[-1].lsn
            try:
                for e in batch:
                    link.conn.send(e.frame, e.payload)
            except (ConnectionError, OSError):
                self._broken(link)

    def _ack_reader(self, link: Link) -> None:
        try:
            while True:
                frame = link.conn.recv()
                if frame.kind == Kind.ERROR:
                    raise ProtocolError((frame.meta or {}).get("reason", "error"))
                if frame.kind != Kind.REPLICATE_ACK:
                    raise ProtocolError(f"successor {link.index} sent {frame.kind.name}")
                self.on_ack(frame.seq)
        except (ConnectionError, OSError, ProtocolError, ConnectionClosed) as exc:
            if not self._closed:
                self.server.log.emit("chain_link_lost", shard=self.shard, successor=link.index, reason=str(exc))
                self._broken(link)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        with self._cond:
            self._cond.notify_all()
            if self.successor is not None:
                self.successor.conn.close()


def join_chain(server: "ParameterServer", chain: ChainReplica, timeout_s: float = 60.0) -> None:
    """A replica that is not in its shard's chain: copy the tail's state, follow it, and
    be appended. Runs until appended (or the job ends)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not chain._closed:
        chain.refresh()
        if chain.position()[0] is not None:
            return  # in the chain already (the first formation)
        if not chain.members:
            time.sleep(0.05)  # the chain is still forming
            continue
        tail = chain.members[-1]
        try:
            conn = dial(tail[1], chain.token, chain.transport, timeout=2.0, max_payload=server.max_payload)
            conn.send(Frame(Kind.REQUEST, shard=server.shard, meta={"op": "chain_join", "index": chain.index}))
            first = conn.recv()
        except (OSError, ProtocolError, ConnectionError):
            time.sleep(0.05)  # the tail is changing: read the chain again
            continue
        if first.kind != Kind.STATE:
            conn.close()
            time.sleep(0.05)
            continue
        with server._state:
            chain.last_lsn, chain.dedupe = install_state(server, first.meta or {}, first.payload)
        server.log.emit("state_installed", shard=server.shard, version=server.version, lsn=chain.last_lsn,
                        source=tail[0])
        # From now on the tail forwards every entry to us on this connection.
        threading.Thread(target=server.serve_authenticated, args=(conn,), daemon=True, name="chain-up").start()
        chain.control.call("chain_join", index=chain.index)
        chain.refresh()
        return
    raise RuntimeError(f"server {chain.index} could not join shard {server.shard}'s chain in {timeout_s}s")

