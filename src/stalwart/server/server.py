"""One parameter server: the wire in front of one shard.

The shard's state (parameters, version, optimizer, sync policy, locks) is a
:class:`~stalwart.shard.ShardState`; how it survives this process is a
:class:`~stalwart.recovery.RecoveryStrategy`. What is left here is the protocol: which
frames a worker may send and what each is answered with.

A push is received straight into the connection's own gradient buffer or, over shared
memory, borrowed where it lies in the segment (no copy: the optimizer reads it there,
and the server is done with it before it reads the connection's next frame), checked
(size, shard, finiteness), applied to the shard as a log entry (the sync policy decides what
the optimizer applies), handed to the strategy with its acknowledgement (a strong chain
sends that once the tail holds the entry), and acknowledged. A push sent in parts, as
backward produced them, is gathered into that buffer first and then goes the same way
(:mod:`stalwart.server.assembly`). A pull waits at the policy's gate and then sends the
buffer itself under the shard's reader lock, so parameters go out without a copy and
never half-updated.

Model buffers (BatchNorm's running statistics) are not parameters: no gradient moves
them, and no optimizer should. Shard 0's server keeps each worker's latest offer of
its buffers (a BUFFERS frame, one float32 vector) and answers it with the mean over the
workers' latest offers; a worker that leaves is taken out of the mean. This is soft
state, outside the shard's log: it is not replicated or checkpointed, and after a
failover the mean is whole again once every worker has offered its buffers (one
averaging interval), which is why statistics, and never parameters, travel this way.
"""

from __future__ import annotations

import threading
import time
import zlib

import numpy as np

from ..metrics import EventLog
from ..optim import all_finite
from ..recovery import Entry, Op, RecoveryStrategy
from ..recovery.base import OWNERS, Ack
from ..shard import ShardState
from ..sync import SyncError
from ..transport import NO_WORKER, Flag, Frame, Kind, ProtocolError
from ..transport.base import Borrow, Listener
from ..transport.service import FrameService, Refused, Session
from .assembly import PushAssembly

# Requests that name a shard and a worker; both are checked before anything else.
_SHARD_REQUESTS = {Kind.PUSH, Kind.INIT, Kind.PULL, Kind.DONE, Kind.REPLICATE, Kind.STATE, Kind.FLUSH,
                   Kind.BUFFERS}
# Kinds whose payload lands in the connection's shard-sized receive buffer.
_SHARD_PAYLOADS = {Kind.PUSH, Kind.INIT, Kind.REPLICATE, Kind.FLUSH}
BUFFERS_MAX_BYTES = 64 << 20  # the largest buffer vector shard 0 averages


class ParameterServer(FrameService):
    """Serves one shard to workers (push, pull, init, done) and to the recovery strategy's
    peers (the frames it owns), one thread per connection.

    ``shard`` is the state served; ``recovery`` the strategy that keeps it alive (the
    base strategy, no recovery, if None). Workers' updates are refused by name when the
    strategy says this server does not take them (a redirect), when their payload is
    malformed or not finite, or when the sync policy refuses their clock; the
    connection and the shard stay intact.
    """

    def __init__(self, listener: Listener, token: bytes, log: EventLog, shard: ShardState,
                 recovery: RecoveryStrategy | None = None):
        super().__init__(listener, token, log)
        self.shard = shard
        self.recovery = recovery if recovery is not None else RecoveryStrategy()
        self.recovery.bind(shard, self.serve_authenticated, log)
        self.max_payload = max(self.recovery.max_payload(), BUFFERS_MAX_BYTES if shard.shard == 0 else 0)
        self.buffers: dict[int, np.ndarray] = {}  # worker -> its latest buffers (shard 0)
        self.ltp = {"rounds": 0, "lost_sum": 0.0, "lost_max": 0.0, "resends": 0}
        self.wait_s = [0.0] * shard.workers  # seconds each worker's pulls spent held at the gate

    # --- wire ----------------------------------------------------------------------
    def payload_sink(self, session: Session, frame: Frame) -> memoryview | None:
        if frame.kind in self.recovery.fresh_payloads or frame.kind == Kind.BUFFERS:
            return None  # a fresh buffer of the announced size (bounded by max_payload)
        if frame.kind not in _SHARD_PAYLOADS:
            raise ProtocolError(f"{frame.kind.name} frames carry no payload here")
        self._check_shard(frame)
        buf = session.data.get("grad")
        if buf is None:
            buf = session.data["grad"] = np.empty_like(self.shard.params)
        if frame.kind == Kind.PUSH and frame.flags & Flag.PART:
            return self._assembly(session).sink(frame, buf)
        view = memoryview(buf).cast("B")
        # A push is used up before the next frame is read (policies sum or apply it, a
        # chain copies it into its log), so it may be borrowed from shared memory.
        return Borrow(view) if frame.kind == Kind.PUSH else view

    def _assembly(self, session: Session) -> PushAssembly:
        parts = session.data.get("parts")
        if parts is None:
            parts = session.data["parts"] = PushAssembly(self.shard.size)
        return parts

    @staticmethod
    def _no_push_in_parts(session: Session, frame: Frame) -> None:
        """Nothing but the rest of a push comes between its parts (see server.assembly);
        checked before a frame is handled (a payload it brought into the gradient buffer
        is lost with the connection, and the half-gathered push with it)."""
        parts = session.data.get("parts")
        if parts is not None and parts.open:
            raise ProtocolError(f"push seq {parts.seq} came in parts and is incomplete; got {frame.kind.name}")

    def _check_shard(self, frame: Frame) -> None:
        if frame.shard != self.shard.shard:
            raise ProtocolError(f"{frame.kind.name} for shard {frame.shard} sent to shard {self.shard.shard}")

    def handle(self, session: Session, frame: Frame) -> None:
        if not (frame.kind == Kind.PUSH and frame.flags & Flag.PART):
            self._no_push_in_parts(session, frame)
        if frame.kind in _SHARD_REQUESTS:
            self._check_shard(frame)
            if frame.worker != NO_WORKER and frame.worker >= self.shard.workers:
                raise ProtocolError(f"worker id {frame.worker} is outside this job (0..{self.shard.workers - 1})")
        handler = {Kind.PUSH: self._on_push, Kind.PULL: self._on_pull, Kind.INIT: self._on_init,
                   Kind.DONE: self._on_done, Kind.BUFFERS: self._on_buffers}.get(frame.kind)
        if handler is not None:
            handler(session, frame)
        elif frame.kind in self.recovery.owns:
            self.recovery.on_frame(session, frame)
        elif frame.kind in OWNERS:
            raise Refused(self.recovery.refusal(frame.kind))
        else:
            raise ProtocolError(f"a server does not accept {frame.kind.name} frames")

    def refuse(self, session: Session, frame: Frame, refused: Refused) -> None:
        with self.shard.lock:
            self.shard.stats["rejected"] += 1
        super().refuse(session, frame, refused)

    def _admit(self) -> None:
        """Only the server the strategy names takes workers' updates; others redirect."""
        if (why := self.recovery.redirect()) is not None:
            raise Refused(why, redirect=True)

    def _ack(self, session: Session, frame: Frame, version: int, meta: dict | None = None) -> Ack:
        """The acknowledgement of a worker's request, to send now or once it is durable."""
        def send() -> None:
            try:
                session.conn.send(Frame(Kind.ACK, shard=self.shard.shard, worker=frame.worker, seq=frame.seq,
                                        clock=version, meta=meta))
            except (ConnectionError, OSError):
                pass  # the worker is gone; it will resend to whoever leads then
        return send

    @staticmethod
    def _hint(frame: Frame) -> dict | None:
        hint = (frame.meta or {}).get("hint")
        if hint is not None and not isinstance(hint, dict):
            raise Refused(f"{frame.kind.name} hint must be a map, got {type(hint).__name__}")
        return hint

    # --- workers' requests -------------------------------------------------------------
    def _on_init(self, session: Session, frame: Frame) -> None:
        shard = self.shard
        values = shard.checked(frame)
        self._admit()
        offered = (frame.meta or {}).get("version")
        if offered is not None and (type(offered) is not int or offered < 0):
            raise Refused(f"INIT version must be a non-negative integer, got {offered!r}")
        with shard.lock:
            resume = self.recovery.init(frame, values, offered)
            # A worker (re)joining learns the clock to continue from.
            ack = self._ack(session, frame, shard.version, {"resume_clock": resume})
            ack = self.recovery.commit(Entry(Op.INIT, frame, values, time.time()), ack)
        if ack is not None:
            ack()

    def _on_push(self, session: Session, frame: Frame) -> None:
        shard = self.shard
        if frame.flags & Flag.PART:
            if not frame.payload_len:
                raise ProtocolError("a PUSH part carries no values")
            frame = self._assembly(session).take(frame, session.data["grad"])
            if frame is None:
                return  # the rest of the push is on its way; it is answered once, whole
        grad = shard.checked(frame)
        session.worker = frame.worker
        if (ltp := (frame.meta or {}).get("ltp")) is not None:
            self._note_ltp_round(frame.worker, ltp)
        hint = self._hint(frame)
        self._admit()
        with shard.lock:
            shard.wait_initialized()
            if self.recovery.applied_before(frame, lambda version: self._ack(session, frame, version)):
                return
            now = time.time()  # wall time: a chain's head stamps it into the entry for every replica
            try:
                version = shard.apply_push(frame.worker, frame.clock, grad, now, session.data.get("pulled_version"),
                                           hint)
            except SyncError as exc:
                raise Refused(str(exc)) from None
            advice = shard.policy.hint_for(frame.worker)
            decisions = shard.policy.drain_events()
            ack = self._ack(session, frame, version, None if advice is None else {"hint": advice})
            ack = self.recovery.commit(Entry(Op.PUSH, frame, grad, now, hint), ack)
        if ack is not None:
            ack()
        shard.log_decisions(decisions)

    def _on_pull(self, session: Session, frame: Frame) -> None:
        shard = self.shard
        observer = frame.worker == NO_WORKER or frame.flags & Flag.ASYNC_PULL
        hint = self._hint(frame)
        arrived = time.monotonic()
        with shard.lock:
            if frame.worker == NO_WORKER and not shard.initialized:
                # An observer (the evaluator) must not hang on a server restarted empty.
                raise Refused(f"shard {shard.shard} holds no parameters yet")
            if not observer:
                try:
                    shard.policy.on_pull(frame.worker, frame.clock, hint, time.time())
                except SyncError as exc:
                    raise Refused(str(exc)) from None
                shard.lock.notify_all()  # an arrival may have opened a barrier
            while not shard.stopping and not (
                    shard.initialized and self.recovery.holds(frame)
                    and (observer or shard.policy.may_proceed(frame.worker, frame.clock))):
                shard.lock.wait()
            if not observer:
                self.wait_s[frame.worker] += time.monotonic() - arrived
            decisions = shard.policy.drain_events()
            if shard.stopping and frame.worker != NO_WORKER:
                session.conn.send(Frame(Kind.STOP, shard=shard.shard))
                return
            # Never blocks here: writers hold the lock, which we hold. Taking the read
            # lock before letting go of it pins ``version`` to the bytes we send.
            shard.rw.acquire_read()
            version = shard.version
        shard.log_decisions(decisions)
        try:
            session.conn.send(Frame(Kind.PARAMS, shard=shard.shard, clock=version),
                              memoryview(shard.params).cast("B"))
        finally:
            shard.rw.release_read()
        session.data["pulled_version"] = version
        with shard.lock:
            shard.stats["pulls"] += 1
            shard.stats["bytes_out"] += shard.nbytes

    def _on_buffers(self, session: Session, frame: Frame) -> None:
        if frame.worker == NO_WORKER:
            raise Refused("BUFFERS comes from a worker")
        if frame.payload is None or frame.payload_len % 4:
            raise Refused(f"BUFFERS carries {frame.payload_len} bytes, not a float32 vector")
        values = np.frombuffer(frame.payload, dtype=np.float32)
        with self.shard.lock:
            sizes = {v.size for v in self.buffers.values()}
            if sizes and values.size not in sizes:
                raise Refused(f"worker {frame.worker} offers {values.size} buffer values; the other "
                              f"workers' models have {sizes.pop()}")
            if not all_finite(values):
                raise Refused(f"BUFFERS from worker {frame.worker} holds NaN or infinite values")
            self.buffers[frame.worker] = values.copy()
            mean = np.mean(list(self.buffers.values()), axis=0, dtype=np.float32)
        session.conn.send(Frame(Kind.BUFFERS, shard=self.shard.shard, worker=frame.worker),
                          memoryview(mean).cast("B"))

    def _on_done(self, session: Session, frame: Frame) -> None:
        session.data["left"] = True
        self._leave(frame.worker, "worker_left")
        session.conn.send(Frame(Kind.ACK, shard=self.shard.shard, clock=self.shard.version))

    def _leave(self, worker: int, event: str) -> None:
        if self.recovery.redirect() is not None:
            return  # membership is decided where updates are taken; its entry reaches every replica
        shard = self.shard
        with shard.lock:
            self.buffers.pop(worker, None)
            now = time.time()  # wall time: a chain's head stamps it into the entry for every replica
            shard.apply_leave(worker, now)
            self.recovery.commit(Entry(Op.LEAVE, Frame(Kind.DONE, shard=shard.shard, worker=worker), None, now), None)
            decisions = shard.policy.drain_events()
        self.log.emit(event, worker=worker, version=shard.version)
        shard.log_decisions(decisions)

    def on_disconnect(self, session: Session) -> None:
        self.recovery.on_disconnect(session)
        if session.worker is not None and session.worker != NO_WORKER and not session.data.get("left"):
            self.shard.note_interruption("worker_lost")
            self._leave(session.worker, "worker_lost")

    # --- statistics ----------------------------------------------------------------
    def _note_ltp_round(self, worker: int, ltp: dict) -> None:
        """Every loss-tolerant round is logged with the fraction of it that was lost."""
        self.log.emit("ltp_round", shard=self.shard.shard, worker=worker, **ltp)
        with self.shard.lock:
            self.ltp["rounds"] += 1
            self.ltp["lost_sum"] += ltp["lost"]
            self.ltp["lost_max"] = max(self.ltp["lost_max"], ltp["lost"])
            self.ltp["resends"] += ltp["resends"]

    def round_stats(self) -> dict:
        """Intervals between updates (BSP: the round time) and the LTP rounds' losses."""
        out = self.shard.update_intervals()
        with self.shard.lock:
            ltp = dict(self.ltp)
        if ltp["rounds"]:
            out.update(ltp_rounds=ltp["rounds"], ltp_lost_mean=ltp["lost_sum"] / ltp["rounds"],
                       ltp_lost_max=ltp["lost_max"], ltp_resends=ltp["resends"])
        return out

    def snapshot_stats(self) -> dict:
        shard = self.shard
        with shard.lock:
            pushes = shard.stats["pushes"]
            return {"version": shard.version, "initialized": shard.initialized, **shard.stats,
                    "wait_s": [round(w, 4) for w in self.wait_s], **self.recovery.stats(),
                    "staleness_mean": shard.stats["staleness_sum"] / pushes if pushes else 0.0}

    def params_crc32(self) -> int:
        """A fingerprint of the shard's state: replicas of a chain must agree bit for bit."""
        with self.shard.lock:
            return zlib.crc32(memoryview(self.shard.params).cast("B"))


def serve_until(server: ParameterServer, should_stop: threading.Event, stats_every_s: float = 1.0) -> None:
    """Log stats of a started server until ``should_stop`` is set, then close it."""
    server.log.emit("server_start", shard=server.shard.shard, address=server.address, size=server.shard.size,
                    policy=server.shard.policy.name)
    last = time.monotonic()
    while not should_stop.wait(0.1):
        if time.monotonic() - last >= stats_every_s:
            server.log.emit("server_stats", shard=server.shard.shard, **server.snapshot_stats())
            last = time.monotonic()
    server.log.emit("server_stop", shard=server.shard.shard, params_crc32=server.params_crc32(),
                    **server.snapshot_stats(), **server.round_stats())
    server.close()
