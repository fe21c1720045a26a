"""The data-plane client: one authenticated connection per shard, push and pull.

Requests to all shards go out before any reply is read, so the shards work in
parallel without a thread per shard. Payloads are sent from, and received into, the
caller's flat buffers (slices of one vector), so parameters land directly in the
model's own storage.

With chain replication a shard has two ends: pushes go to its head and pulls to its
tail (``tails``), on two connections; without, both go to the one server.

What happens when a shard's connection breaks (its server died) is the client's
:class:`~stalwart.worker.failover.Failover`: fail, reconnect and redo the request (a
chain recognizes a push it already holds), or detach every shard for the owner to
train locally until :meth:`ParameterClient.reattach` and :meth:`ParameterClient.flush`
bring them back (stateless servers).
"""

from __future__ import annotations

import select
import time
from dataclasses import dataclass

import numpy as np

from ..transport import NO_WORKER, Connection, Flag, Frame, Kind, ProtocolError, dial
from .failover import Failover, NoFailover


class ServerError(RuntimeError):
    """A server refused a request; the message carries its reason."""


class JobStopping(SystemExit):
    """The job is stopping: finish up, do not wait for more.

    A ``SystemExit`` of status 0, so that a user's script that does not catch it ends
    quietly, as the job asked (its worker has done nothing wrong); one that wants to
    save something first catches it."""

    def __init__(self, *args):
        super().__init__(0)


class Redirect(ConnectionError):
    """The server is no longer the shard's head: find the shard again."""


@dataclass
class Request:
    """One push and/or pull to every shard: the views to send from and receive into."""
    grads: list[memoryview] | None
    targets: list[memoryview] | None
    clock: int
    wait: bool
    pull_meta: dict | None


class ParameterClient:
    """A worker's (or observer's) data-plane handle on every shard of a job.

    ``shards`` are where to push, per shard (a chain's head), ``tails`` where to pull
    (a strong chain's tail; the same servers without chains) and ``bounds`` the shard
    boundaries in the flat parameter vector. ``failover`` says what a broken shard
    connection does to a request (:mod:`stalwart.worker.failover`; by default it fails
    it). One request at a time: :meth:`push_pull` sends to every shard first and then
    reads the replies frame by frame as they arrive.
    """

    def __init__(self, shards: list[str], bounds: list[int], token: bytes, *,
                 worker: int = NO_WORKER, transport: str = "tcp", timeout: float = 10.0,
                 tails: list[str] | None = None, failover: Failover | None = None, buffer_size: int = 0):
        if len(bounds) != len(shards) + 1:
            raise ValueError(f"{len(shards)} shards need {len(shards) + 1} bounds, got {len(bounds)}")
        self.worker, self.bounds = worker, bounds
        self.buffer_size = buffer_size  # floats of model buffers averaged through shard 0
        self._opened: list[Connection] = []  # every connection ever dialled: their byte counts
        self.token, self.transport, self.timeout = token, transport, timeout
        self.failover = failover if failover is not None else NoFailover()
        self.broken: set[int] = set()              # detached shards that lost their server
        self._detached: dict[int, tuple[float, list[str]]] = {}  # shard -> (since, failed peers)
        self.conns: list[Connection] = []       # pushes (a chain's head)
        self.pull_conns: list[Connection] = []  # pulls (a chain's tail; else the same connection)
        try:
            for s, address in enumerate(shards):
                try:
                    self.connect(s, address, (tails or shards)[s])
                except (ConnectionError, OSError):
                    # Its server died between the map and the dial (a worker that starts,
                    # or restarts, while a server is down): find it as after a break.
                    if not self.failover.can_reach:
                        raise
                    self.failover.reach(self, s, [address], lambda: None)
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
        floats = self.bounds[s + 1] - self.bounds[s]
        conn = dial(address, self.token, self.transport, self.timeout,
                    max_payload=4 * (max(floats, self.buffer_size) if s == 0 else floats))
        self._opened.append(conn)
        return conn

    @property
    def bytes_by_path(self) -> dict[str, int]:
        """Payload bytes pushed and pulled, by the path they took (``tcp``, ``shm``,
        ``ltp``), over every connection this client has had, closed ones included."""
        total = {"shm": 0, "tcp": 0, "ltp": 0}
        for conn in self._opened:
            for path, n in conn.bytes_moved().items():
                total[path] = total.get(path, 0) + n
        return total

    def connect(self, s: int, head: str, tail: str) -> None:
        """(Re)open shard ``s``'s connections: pushes to ``head``, pulls from ``tail``."""
        push = self._dial(s, head)
        pull = push if tail == head else self._dial(s, tail)
        if s < len(self.conns):
            self.conns[s], self.pull_conns[s] = push, pull
        else:
            self.conns.append(push)
            self.pull_conns.append(pull)

    def has_connection(self, s: int) -> bool:
        return s < len(self.conns)

    def disconnect(self, s: int) -> list[str]:
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
        frame = conn.recv(None if into is None else (lambda f: into if f.kind in (Kind.PARAMS, Kind.BUFFERS) else None))
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
            ack = self._recv(s, Kind.ACK)
            clock = (ack.meta or {}).get("resume_clock", 0)
            resumes.append(clock if type(clock) is int and clock >= 0 else 0)
        # Shards may be a barrier apart when a worker rejoins a running job: continue from
        # the earliest, which no shard has passed by more than that one barrier.
        return min(resumes)

    def push_part(self, s: int, part: np.ndarray, at: int | None, clock: int) -> None:
        """Send ``part`` (values ``at`` onwards of shard ``s``'s gradient; None: all of
        them) ahead of the next :meth:`push_pull`, as (a part of) its push (see
        :mod:`stalwart.server.assembly`); that request then sends only the pull to a
        shard whose push is all out."""
        self.conns[s].send(self._push_frame(s, self.seq + 1, clock, at), memoryview(part).cast("B"))

    def _push_frame(self, s: int, seq: int, clock: int, at: int | None = None) -> Frame:
        """The header of shard ``s``'s push (a part of it from float ``at``, if given)."""
        meta = ({} if at is None else {"at": at}) | ({} if self.hint is None else {"hint": self.hint})
        return Frame(Kind.PUSH, shard=s, worker=self.worker, seq=seq, clock=clock,
                     flags=0 if at is None else Flag.PART, meta=meta or None)

    def push_pull(self, grad: np.ndarray | None, params: np.ndarray | None, clock: int,
                  wait: bool = True, pushed: frozenset[int] = frozenset(),
                  broke: frozenset[int] = frozenset()) -> list[int]:
        """Push ``grad`` for ``clock`` and/or pull into ``params``; returns shard versions.

        With ``wait`` the pull waits at each shard's sync gate for ``clock``; without, it
        returns the latest parameters at once. ``pushed`` are the shards whose push already
        went out in parts (:meth:`push_part`), ``broke`` those whose connection broke
        while it did: they are dealt with as a shard that breaks now.
        """
        grads = self._views(grad) if grad is not None else None
        targets = self._views(params) if params is not None else None
        self.seq += 1
        self.pushes_sent += grads is not None
        request = Request(grads, targets, clock, wait, {"hint": self.hint} if self.hint is not None and wait else None)
        broken: set[int] = set()
        pending: list[int] = []
        for s in (s for s in range(self.shards) if s not in self.detached):
            if s in broke:
                broken.add(s)
                continue
            try:
                self._send(s, request, push=s not in pushed)
                pending.append(s)
            except (ConnectionError, OSError):
                broken.add(s)
        hint = None
        gone: set[int] = set()  # broken, and left so by the failover
        owed = {s: self._owed(request) for s in pending}
        try:
            hint = self._collect(request, owed, broken, gone, hint)
        except (ConnectionError, OSError, ServerError, ProtocolError):
            # The request failed (a failover gave up): replies other shards still owe would
            # be read as the answers to the next request, a whole request late, forever
            # after. Close those connections instead; the next request redials them.
            for s in owed:
                self.disconnect(s)
            raise
        if grads is not None:
            self.hint = hint
        return list(self.versions)

    def _collect(self, request: Request, owed: dict[int, set[str]], broken: set[int], gone: set[int],
                 hint: dict | None) -> dict | None:
        """Read the replies ``owed`` (striking each off as it comes), dealing with shards
        that break meanwhile through the failover; returns the sync leader's hint."""
        while owed or broken:
            # A lost shard is dealt with before the others are waited on (see Reconnect).
            for s in sorted(broken):
                redone, hint = self.failover.broken(self, s, request, hint)
                if not redone:
                    gone.add(s)
            broken.clear()
            for s, conn in self._ready(owed) if owed else ():
                if s not in owed:
                    continue  # broke on its other connection just now
                try:
                    hint = self._take(s, conn, request, owed[s], hint)
                except (ConnectionError, OSError):
                    broken.add(s)
                    del owed[s]
                    continue
                except ServerError:
                    del owed[s]  # it answered, with a refusal: its stream is in step and stays open
                    raise
                if not owed[s]:
                    del owed[s]
        if gone:
            self.failover.settle(self, gone)
        return hint

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

    def _send(self, s: int, request: Request, push: bool = True) -> None:
        if request.grads is not None and push:
            self.conns[s].send(self._push_frame(s, self.seq, request.clock), request.grads[s])
        if request.targets is not None:
            flags = (0 if request.wait else Flag.ASYNC_PULL) | (Flag.AFTER_PUSH if request.grads is not None else 0)
            self.pull_conns[s].send(Frame(Kind.PULL, shard=s, worker=self.worker, seq=self.seq, clock=request.clock,
                                          flags=flags, meta=request.pull_meta))

    @staticmethod
    def _owed(request: Request) -> set[str]:
        """What a request's reply consists of: a push acknowledgement, parameters, or both."""
        return {name for name, asked in (("ack", request.grads), ("params", request.targets)) if asked is not None}

    def redo(self, s: int, request: Request, hint: dict | None) -> tuple[int | None, dict | None]:
        """On shard ``s``'s new connection: offer our parameters (a worker's), send the
        request again and read its whole reply; returns (the version the shard resumed
        from, if offered; the hint so far)."""
        found = None
        if self.worker != NO_WORKER and request.targets is not None:
            self.conns[s].send(Frame(Kind.INIT, shard=s, worker=self.worker),
                               request.targets[s])
            found = self._recv(s, Kind.ACK).version  # the version the shard resumed from
        self._send(s, request)
        owed = self._owed(request)
        while owed:
            conn = self.conns[s] if "ack" in owed else self.pull_conns[s]
            hint = self._take(s, conn, request, owed, hint)
        return found, hint

    def _take(self, s: int, conn: Connection, request: Request, owed: set[str], hint: dict | None) -> dict | None:
        """Read one frame of shard ``s``'s reply from ``conn`` and strike what it answers
        off ``owed``. On one connection for both, the parameters may come first (a chain's
        head acknowledges a push only once the tail holds it, and may answer the pull before)."""
        grads, targets = request.grads, request.targets
        if conn is self.conns[s] and "ack" in owed:
            either = "params" in owed and conn is self.pull_conns[s]
            frame = self._recv(s, Kind.ACK, targets[s] if either else None,
                               also=Kind.PARAMS if either else None)
        else:
            frame = self._recv(s, Kind.PARAMS, targets[s])
        if frame.kind == Kind.PARAMS:
            owed.discard("params")
            self.versions[s] = max(self.versions[s], frame.version)
            self.bytes_pulled += targets[s].nbytes
            return hint
        owed.discard("ack")
        pulled = targets is not None and "params" not in owed
        self.acked_versions[s] = frame.version
        self.versions[s] = max(self.versions[s], frame.version) if pulled else frame.version
        self.bytes_pushed += grads[s].nbytes
        if self._acked_seq[s] != self.seq:  # an ack of a resend is the same push's
            self._acked_seq[s] = self.seq
            self.pushes_acked += 1
        return (frame.meta or {}).get("hint", hint)

    # --- stateless servers: detach, reattach, flush --------------------------------------
    def detach(self, s: int) -> None:
        """Stop talking to shard ``s`` until it is reattached (and leave its sync gate:
        the server sees this worker go, so no barrier waits for it meanwhile)."""
        peers = [p for p in self.disconnect(s) if p]
        since, failed = self._detached.get(s, (time.monotonic(), []))
        self._detached[s] = (since, failed or peers)

    def reattach(self, s: int, base: np.ndarray, version: int, clock: int) -> tuple[int, int]:
        """Find shard ``s`` again and offer ``base`` (our copy, at ``version``) for its
        rebuild; returns (the version it was rebuilt at, the clock to continue from)."""
        since, failed = self._detached[s]
        heads, tails = self.failover.locate(failed)
        self.connect(s, heads[s], tails[s])
        self.conns[s].send(Frame(Kind.INIT, shard=s, worker=self.worker, clock=clock,
                                 meta={"version": version}), memoryview(base).cast("B"))
        ack = self._recv(s, Kind.ACK)
        resume = (ack.meta or {}).get("resume_clock", 0)
        self.failover.on_event("reconnected", shard=s, attempts=None, waited_s=round(time.monotonic() - since, 4),
                               last_acked_version=self.acked_versions[s], found_version=ack.version,
                               server_version=ack.version)
        return ack.version, resume if type(resume) is int and resume >= 0 else 0

    def flush(self, s: int, delta: np.ndarray, count: int, base_version: int) -> dict:
        """Send shard ``s`` the summed change of ``count`` local steps made from
        ``base_version``; returns the server's answer (version, staleness, scale)."""
        self.conns[s].send(Frame(Kind.FLUSH, shard=s, worker=self.worker,
                                 meta={"count": count, "base_version": base_version}),
                           memoryview(delta).cast("B"))
        ack = self._recv(s, Kind.ACK)
        self.broken.discard(s)
        del self._detached[s]
        self.versions[s] = self.acked_versions[s] = ack.version
        return {**(ack.meta or {}), "version": ack.version}

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
                self._recv(s, Kind.ACK)
            except JobStopping:
                pass

    def average_buffers(self, values: np.ndarray) -> np.ndarray:
        """Offer this worker's buffers (one float32 vector) to shard 0's server; returns
        the mean over the workers' latest offers (see :mod:`stalwart.server.server`)."""
        if values.dtype != np.float32 or values.size != self.buffer_size:
            raise ValueError(f"expected {self.buffer_size} float32 buffer values, got {values.dtype} {values.shape}")
        out = np.empty_like(values)
        self.conns[0].send(Frame(Kind.BUFFERS, shard=0, worker=self.worker), memoryview(values).cast("B"))
        self._recv(0, Kind.BUFFERS, memoryview(out).cast("B"))
        return out

    def goodbye(self) -> None:
        """Leave the job (if a server is still there to tell) and close every connection."""
        try:
            self.leave()
        except (ConnectionError, OSError, ProtocolError, ServerError):
            pass  # the servers are already gone; there is no barrier left to release
        finally:
            self.close()

    def close(self) -> None:
        for conn in {id(c): c for c in self.conns + self.pull_conns}.values():
            conn.close()
        self.conns, self.pull_conns = [], []
