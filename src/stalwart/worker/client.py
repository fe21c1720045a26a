"""The data-plane client: one authenticated connection per shard, push and pull.

Requests to all shards go out before any reply is read, so the shards work in
parallel without a thread per shard. Payloads are sent from, and received into, the
caller's flat buffers (slices of one vector), so parameters land directly in the
model's own storage.

With chain replication a shard has two ends: pushes go to its head and pulls to its
tail (``tails``), on two connections; without, both go to the one server.

When a shard's connection breaks (its server died) and the client was given a way to
find servers (``resolve``: report the broken addresses to the coordinator, read the
shard map) and a time budget, it redials with bounded exponential backoff; on the new
connection it offers its own parameters (a server restarted with no state of its own
keeps the first offer; one restored from a checkpoint or a chain ignores it), resends
the push it was making (a chain recognizes a push it already holds), and pulls. Each
recovery is reported through ``on_event``.

With ``detachable`` (stateless servers, :mod:`stalwart.recovery.stateless`) a broken
shard is not waited for: every shard joins ``detached`` (the worker goes local as a
whole, see there why), later requests skip them, and the owner trains them locally
until :meth:`reattach` and :meth:`flush` bring them back.
"""

from __future__ import annotations

import select
import time
from typing import Callable, TypeVar

import numpy as np

from ..transport import NO_WORKER, Connection, Flag, Frame, Kind, ProtocolError, dial

BACKOFF_FIRST_S = 0.02
BACKOFF_MAX_S = 1.0
T = TypeVar("T")


class ServerError(RuntimeError):
    """A server refused a request; the message carries its reason."""


class JobStopping(Exception):
    """The servers say the job is stopping: finish up, do not wait for more."""


class ServerUnavailable(ConnectionError):
    """A shard's server could not be reached again within the reconnect budget."""


class Redirect(ConnectionError):
    """The server is no longer the shard's head: find the shard again."""


class ParameterClient:
    def __init__(self, shards: list[str], bounds: list[int], token: bytes, *,
                 worker: int = NO_WORKER, transport: str = "tcp", timeout: float = 10.0,
                 tails: list[str] | None = None,
                 resolve: Callable[[list[str]], tuple[list[str], list[str]]] | None = None,
                 reconnect_s: float = 0.0, on_event: Callable[..., None] | None = None,
                 detachable: bool = False):
        if len(bounds) != len(shards) + 1:
            raise ValueError(f"{len(shards)} shards need {len(shards) + 1} bounds, got {len(bounds)}")
        self.worker, self.bounds = worker, bounds
        self.token, self.transport, self.timeout = token, transport, timeout
        self.resolve, self.reconnect_s, self.on_event = resolve, reconnect_s, on_event
        self.detachable = detachable
        self.broken: set[int] = set()              # detached shards that lost their server
        self._detached: dict[int, tuple[float, list[str]]] = {}  # shard -> (since, failed peers)
        self.conns: list[Connection] = []       # pushes (a chain's head)
        self.pull_conns: list[Connection] = []  # pulls (a chain's tail; else the same connection)
        try:
            for s, address in enumerate(shards):
                try:
                    self._connect(s, address, (tails or shards)[s])
                except (ConnectionError, OSError):
                    # Its server died between the map and the dial (a worker that starts,
                    # or restarts, while a server is down): find it as after a break.
                    if self.resolve is None or self.reconnect_s <= 0:
                        raise
                    self._reach(s, [address], lambda: None)
        except BaseException:
            self.close()
            raise
        self.versions = [0] * len(shards)
        self.acked_versions = [0] * len(shards)  # the version in each shard's last push ack
        self._acked_seq = [0] * len(shards)
        self.bytes_pushed = 0
        self.bytes_pulled = 0
        self.pushes_sent = 0    # distinct pushes (a resend is not counted again)
        self.pushes_acked = 0   # push acknowledgements received, summed over shards
        self.seq = 0
        # What the sync leader asked this worker to relay to every shard (see
        # stalwart.sync.base): taken from push acknowledgements, sent with pulls.
        self.hint: dict | None = None

    def _dial(self, s: int, address: str) -> Connection:
        return dial(address, self.token, self.transport, self.timeout,
                    max_payload=(self.bounds[s + 1] - self.bounds[s]) * 4)

    def _connect(self, s: int, head: str, tail: str) -> None:
        push = self._dial(s, head)
        pull = push if tail == head else self._dial(s, tail)
        if s < len(self.conns):
            self.conns[s], self.pull_conns[s] = push, pull
        else:
            self.conns.append(push)
            self.pull_conns.append(pull)

    def _disconnect(self, s: int) -> list[str]:
        """Close shard ``s``'s connections; returns their peers' addresses."""
        peers = []
        for conn in {id(c): c for c in (self.conns[s], self.pull_conns[s])}.values():
            peers.append(conn.peer)
            conn.close()
        return peers

    @property
    def detached(self):
        """The shards being trained through locally (a live view)."""
        return self._detached.keys()

    @property
    def shards(self) -> int:
        return len(self.conns)

    def _views(self, flat: np.ndarray) -> list[memoryview]:
        if flat.dtype != np.float32 or flat.ndim != 1 or flat.size != self.bounds[-1]:
            raise ValueError(f"expected a flat float32 vector of {self.bounds[-1]} values, "
                             f"got {flat.dtype} {flat.shape}")
        return [memoryview(flat[self.bounds[s]:self.bounds[s + 1]]).cast("B") for s in range(self.shards)]

    def _recv(self, s: int, expect: Kind, into: memoryview | None = None,
              also: Kind | None = None) -> Frame:
        """The next reply on the connection for ``expect`` (or ``also``, which may come
        first when push and pull share a connection: a chain's head acknowledges a push
        only once the tail holds it, and may answer the pull before)."""
        conn = self.pull_conns[s] if expect == Kind.PARAMS else self.conns[s]
        frame = conn.recv(None if into is None else (lambda f: into if f.kind == Kind.PARAMS else None))
        if frame.kind == Kind.STOP:
            raise JobStopping()
        if frame.kind == Kind.ERROR and (frame.meta or {}).get("redirect"):
            raise Redirect(f"shard {s}: {frame.meta.get('reason')}")
        if frame.kind == Kind.ERROR:
            raise ServerError(f"shard {s}: {(frame.meta or {}).get('reason', 'unspecified error')}")
        if frame.kind != expect and frame.kind != also:
            raise ProtocolError(f"shard {s} answered {frame.kind.name}, expected {expect.name}")
        return frame

    def init(self, params: np.ndarray) -> int:
        """Offer initial parameters (each shard keeps the first offer it gets); returns
        the clock to continue from (0 for a new job, later for a worker that rejoins)."""
        for s, view in enumerate(self._views(params)):
            self.conns[s].send(Frame(Kind.INIT, shard=s, worker=self.worker), view)
        resumes = []
        for s in range(self.shards):
            ack = self._recv(s, Kind.PUSH_ACK)
            clock = (ack.meta or {}).get("resume_clock", 0)
            resumes.append(clock if type(clock) is int and clock >= 0 else 0)
        # Shards may be a barrier apart when a worker rejoins a running job: continue from
        # the earliest, which no shard has passed by more than that one barrier.
        return min(resumes)

    def push_pull(self, grad: np.ndarray | None, params: np.ndarray | None, clock: int,
                  wait: bool = True) -> list[int]:
        """Push ``grad`` for ``clock`` and/or pull into ``params``; returns shard versions.

        With ``wait`` the pull waits at each shard's sync gate for ``clock``; without, it
        returns the latest parameters at once.
        """
        grads = self._views(grad) if grad is not None else None
        targets = self._views(params) if params is not None else None
        self.seq += 1
        self.pushes_sent += grads is not None
        pull_meta = {"hint": self.hint} if self.hint is not None and wait else None
        broken: set[int] = set()
        pending: list[int] = []
        for s in (s for s in range(self.shards) if s not in self.detached):
            try:
                self._send(s, grads, targets, clock, wait, pull_meta)
                pending.append(s)
            except (ConnectionError, OSError):
                broken.add(s)
        hint = None
        owed = {s: self._owed(grads, targets) for s in pending}
        while owed or (broken and not self.detachable):
            if broken and not self.detachable:
                # Redo a lost shard's request before waiting on the others: their replies
                # may wait on a barrier that other workers reach only once the restarted
                # server has seen this worker's request (see _ready).
                for s in sorted(broken):
                    hint = self._recover(s, grads, targets, clock, wait, pull_meta, hint)
                broken.clear()
                continue
            for s, conn in self._ready(owed):
                if s not in owed:
                    continue  # broke on its other connection just now
                try:
                    hint = self._take(s, conn, grads, targets, owed[s], hint)
                except (ConnectionError, OSError):
                    broken.add(s)
                    del owed[s]
                    continue
                if not owed[s]:
                    del owed[s]
        if broken:  # only a detachable client gets here with shards broken
            self.broken |= broken
            for s in range(self.shards):
                self.detach(s)
        if grads is not None:
            self.hint = hint
        return list(self.versions)

    def _ready(self, owed: dict[int, set[str]]) -> list[tuple[int, Connection]]:
        """The connections that owe a part of a reply and have something to read now (that
        part, or their server gone), waiting until there is one.

        Replies are read frame by frame as they come, not shard by shard: a worker blocked
        on one shard's barrier would not notice that another shard's server died meanwhile,
        and the barrier may be one that the other workers pass only after this worker
        redoes its request on the restarted server (which, knowing no clocks, learns them
        from the requests it gets). A push's acknowledgement comes before the barrier, so
        a shard whose first frame arrived may still owe the rest.
        """
        waiting = {}  # by descriptor: a connection that owes both parts is waited on once
        for s, parts in owed.items():
            if "ack" in parts:
                waiting[self.conns[s].fileno()] = (s, self.conns[s])
            if "params" in parts:
                waiting[self.pull_conns[s].fileno()] = (s, self.pull_conns[s])
        if len(waiting) == 1:
            return list(waiting.values())
        poller = select.poll()
        for fd in waiting:
            poller.register(fd, select.POLLIN)
        return [waiting[fd] for fd, _ in poller.poll()]

    def _send(self, s: int, grads, targets, clock: int, wait: bool, pull_meta: dict | None) -> None:
        if grads is not None:
            self.conns[s].send(Frame(Kind.PUSH, shard=s, worker=self.worker, seq=self.seq, clock=clock,
                                     meta=None if self.hint is None else {"hint": self.hint}), grads[s])
        if targets is not None:
            flags = (0 if wait else Flag.ASYNC_PULL) | (Flag.AFTER_PUSH if grads is not None else 0)
            self.pull_conns[s].send(Frame(Kind.PULL, shard=s, worker=self.worker, seq=self.seq, clock=clock,
                                          flags=flags, meta=pull_meta))

    @staticmethod
    def _owed(grads, targets) -> set[str]:
        """What a request's reply consists of: a push acknowledgement, parameters, or both."""
        return {name for name, asked in (("ack", grads), ("params", targets)) if asked is not None}

    def _receive(self, s: int, grads, targets, hint: dict | None) -> dict | None:
        """Shard ``s``'s whole reply, waiting for each part in turn."""
        owed = self._owed(grads, targets)
        while owed:
            conn = self.conns[s] if "ack" in owed else self.pull_conns[s]
            hint = self._take(s, conn, grads, targets, owed, hint)
        return hint

    def _take(self, s: int, conn: Connection, grads, targets, owed: set[str], hint: dict | None) -> dict | None:
        """Read one frame of shard ``s``'s reply from ``conn`` and strike what it answers
        off ``owed``. On one connection for both, the parameters may come first (a chain's
        head acknowledges a push only once the tail holds it, and may answer the pull before)."""
        if conn is self.conns[s] and "ack" in owed:
            either = "params" in owed and conn is self.pull_conns[s]
            frame = self._recv(s, Kind.PUSH_ACK, targets[s] if either else None,
                               also=Kind.PARAMS if either else None)
        else:
            frame = self._recv(s, Kind.PARAMS, targets[s])
        if frame.kind == Kind.PARAMS:
            owed.discard("params")
            self.versions[s] = max(self.versions[s], frame.clock)
            self.bytes_pulled += targets[s].nbytes
            return hint
        owed.discard("ack")
        pulled = targets is not None and "params" not in owed
        self.acked_versions[s] = frame.clock
        self.versions[s] = max(self.versions[s], frame.clock) if pulled else frame.clock
        self.bytes_pushed += grads[s].nbytes
        if self._acked_seq[s] != self.seq:  # an ack of a resend is the same push's
            self._acked_seq[s] = self.seq
            self.pushes_acked += 1
        return (frame.meta or {}).get("hint", hint)

    def _recover(self, s: int, grads, targets, clock: int, wait: bool, pull_meta: dict | None,
                 hint: dict | None) -> dict | None:
        """Shard ``s``'s connection broke: find its server again and redo this request there."""
        failed = self._disconnect(s)
        if self.resolve is None or self.reconnect_s <= 0:
            raise ServerUnavailable(f"lost the connection to shard {s} and reconnecting is off "
                                    f"(recovery strategy none)")
        last_acked, t0 = self.acked_versions[s], time.monotonic()

        def redo() -> tuple[int | None, dict | None]:
            found = None
            if self.worker != NO_WORKER and targets is not None:
                self.conns[s].send(Frame(Kind.INIT, shard=s, worker=self.worker), targets[s])
                found = self._recv(s, Kind.PUSH_ACK).clock  # the version the shard resumed from
            self._send(s, grads, targets, clock, wait, pull_meta)
            return found, self._receive(s, grads, targets, hint)

        attempts, (found, hint) = self._reach(s, failed, redo)
        if self.on_event is not None:
            self.on_event("reconnected", shard=s, attempts=attempts, waited_s=round(time.monotonic() - t0, 4),
                          last_acked_version=last_acked, found_version=found, server_version=self.versions[s])
        return hint

    def _reach(self, s: int, failed: list[str], then: Callable[[], T]) -> tuple[int, T]:
        """Find shard ``s``'s server (report ``failed``, read the map, dial) and run ``then``
        on the new connection, retrying both with bounded exponential backoff within the
        reconnect budget; returns (attempts, what ``then`` returned)."""
        t0 = time.monotonic()
        delay, attempts = BACKOFF_FIRST_S, 0
        while True:
            attempts += 1
            try:
                heads, tails = self.resolve(failed)
                self._connect(s, heads[s], tails[s])
                return attempts, then()
            except (ConnectionError, OSError):
                if s < len(self.conns):
                    failed = self._disconnect(s)
            if time.monotonic() - t0 + delay > self.reconnect_s:
                raise ServerUnavailable(f"shard {s} did not come back within {self.reconnect_s:g}s "
                                        f"({attempts} attempts)")
            time.sleep(delay)  # backoff between attempts to reach a restarting server
            delay = min(2 * delay, BACKOFF_MAX_S)

    # --- stateless servers: detach, reattach, flush --------------------------------------
    def detach(self, s: int) -> None:
        """Stop talking to shard ``s`` until it is reattached (and leave its sync gate:
        the server sees this worker go, so no barrier waits for it meanwhile)."""
        peers = [p for p in self._disconnect(s) if p]
        since, failed = self._detached.get(s, (time.monotonic(), []))
        self._detached[s] = (since, failed or peers)

    def reattach(self, s: int, base: np.ndarray, version: int, clock: int) -> tuple[int, int]:
        """Find shard ``s`` again and offer ``base`` (our copy, at ``version``) for its
        rebuild; returns (the version it was rebuilt at, the clock to continue from)."""
        since, failed = self._detached[s]
        heads, tails = self.resolve(failed)
        self._connect(s, heads[s], tails[s])
        self.conns[s].send(Frame(Kind.INIT, shard=s, worker=self.worker, clock=clock,
                                 meta={"version": version}), memoryview(base).cast("B"))
        ack = self._recv(s, Kind.PUSH_ACK)
        resume = (ack.meta or {}).get("resume_clock", 0)
        if self.on_event is not None:
            self.on_event("reconnected", shard=s, attempts=None, waited_s=round(time.monotonic() - since, 4),
                          last_acked_version=self.acked_versions[s], found_version=ack.clock,
                          server_version=ack.clock)
        return ack.clock, resume if type(resume) is int and resume >= 0 else 0

    def flush(self, s: int, delta: np.ndarray, count: int, base_version: int) -> dict:
        """Send shard ``s`` the summed change of ``count`` local steps made from
        ``base_version``; returns the server's answer (version, staleness, scale)."""
        self.conns[s].send(Frame(Kind.FLUSH, shard=s, worker=self.worker,
                                 meta={"count": count, "base_version": base_version}),
                           memoryview(delta).cast("B"))
        ack = self._recv(s, Kind.PUSH_ACK)
        self.broken.discard(s)
        del self._detached[s]
        self.versions[s] = self.acked_versions[s] = ack.clock
        return {**(ack.meta or {}), "version": ack.clock}

    def push(self, grad: np.ndarray, clock: int) -> list[int]:
        return self.push_pull(grad, None, clock)

    def pull(self, params: np.ndarray, clock: int = 0, wait: bool = True) -> list[int]:
        return self.push_pull(None, params, clock, wait)

    def leave(self) -> None:
        """Tell every shard this worker is done, so that no barrier waits for it."""
        live = [s for s in range(self.shards) if s not in self.detached]
        for s in live:
            self.conns[s].send(Frame(Kind.DONE, shard=s, worker=self.worker))
        for s in live:
            try:
                self._recv(s, Kind.PUSH_ACK)
            except JobStopping:
                pass

    def close(self) -> None:
        for conn in {id(c): c for c in self.conns + self.pull_conns}.values():
            conn.close()
        self.conns, self.pull_conns = [], []
