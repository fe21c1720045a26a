"""One parameter server: one shard of the parameters, its optimizer and its sync gate.

The shard is a single contiguous float32 buffer. A push is received straight into the
connection's own gradient buffer, checked (size, shard, finiteness), handed to the sync
policy, and, if the policy says so, applied by the optimizer; a pull waits at the
policy's gate and then sends the buffer itself.

Concurrency: ``_state`` (a condition) guards the policy, the version and the gate;
``_rw`` lets many pulls read the buffer while no update writes it, so parameters go out
without a copy and never half-updated. Lock order is always state -> rw.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ..metrics import EventLog
from ..sync import SyncError, SyncPolicy
from ..transport import NO_WORKER, Flag, Frame, Kind, ProtocolError
from ..transport.base import Listener
from ..transport.service import FrameService, Session
from .optim import ServerOptimizer

if TYPE_CHECKING:
    from ..recovery import Checkpointer


class ReadWriteLock:
    """Many readers or one writer; a waiting writer holds back new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class ParameterServer(FrameService):
    def __init__(self, listener: Listener, token: bytes, log: EventLog, *, shard: int, size: int,
                 optimizer: ServerOptimizer, policy: SyncPolicy, workers: int,
                 checkpointer: "Checkpointer | None" = None):
        super().__init__(listener, token, log)
        self.shard, self.size, self.workers = shard, size, workers
        self.optimizer, self.policy = optimizer, policy
        self.params = np.zeros(size, dtype=np.float32)
        self.nbytes = self.params.nbytes
        self.max_payload = self.nbytes
        self.version = 0
        self.initialized = False
        self.stopping = False
        self._state = threading.Condition()
        self._rw = ReadWriteLock()
        self.stats = {"pushes": 0, "pulls": 0, "bytes_in": 0, "bytes_out": 0, "rejected": 0,
                      "staleness_sum": 0, "staleness_max": 0}
        self.wait_s = [0.0] * workers  # seconds each worker's pulls spent held at the gate
        self.checkpointer = checkpointer
        # After a (re)start or a lost worker, the next applied update is logged: the
        # moment training through this shard resumed.
        self._resume_reason: str | None = "start"

    # --- wire ----------------------------------------------------------------------
    def payload_sink(self, session: Session, frame: Frame) -> memoryview | None:
        if frame.kind not in (Kind.PUSH, Kind.INIT):
            raise ProtocolError(f"{frame.kind.name} frames carry no payload here")
        if frame.shard != self.shard:
            raise ProtocolError(f"{frame.kind.name} for shard {frame.shard} sent to shard {self.shard}")
        buf = session.data.get("grad")
        if buf is None:
            buf = session.data["grad"] = np.empty(self.size, dtype=np.float32)
        return memoryview(buf).cast("B")

    def handle(self, session: Session, frame: Frame) -> None:
        if frame.kind in (Kind.PUSH, Kind.INIT, Kind.PULL, Kind.DONE):
            if frame.shard != self.shard:
                raise ProtocolError(f"{frame.kind.name} for shard {frame.shard} sent to shard {self.shard}")
            if frame.worker != NO_WORKER and frame.worker >= self.workers:
                raise ProtocolError(f"worker id {frame.worker} is outside this job (0..{self.workers - 1})")
        if frame.kind == Kind.PUSH:
            self._on_push(session, frame)
        elif frame.kind == Kind.PULL:
            self._on_pull(session, frame)
        elif frame.kind == Kind.INIT:
            self._on_init(session, frame)
        elif frame.kind == Kind.DONE:
            self._on_done(session, frame)
        else:
            raise ProtocolError(f"a server does not accept {frame.kind.name} frames")

    def _payload(self, frame: Frame) -> np.ndarray:
        if frame.payload is None or frame.payload_len != self.nbytes:
            raise ProtocolError(f"{frame.kind.name} carries {frame.payload_len} bytes; "
                                f"shard {self.shard} holds {self.nbytes}")
        values = np.frombuffer(frame.payload, dtype=np.float32)
        # One float64 pass: the sum of finite float32 values cannot overflow float64,
        # so a non-finite sum means a NaN or an infinity somewhere in the payload.
        if not np.isfinite(values.sum(dtype=np.float64)):
            raise _Rejected(f"{frame.kind.name} from worker {frame.worker} holds NaN or infinite "
                            f"values; refused so that the shard stays intact")
        return values

    def _reject(self, session: Session, frame: Frame, reason: str) -> None:
        self.stats["rejected"] += 1
        self.log.emit("rejected", peer=session.conn.peer, worker=frame.worker, reason=reason)
        session.conn.send(Frame(Kind.ERROR, shard=self.shard, meta={"reason": reason}))

    def _on_init(self, session: Session, frame: Frame) -> None:
        try:
            values = self._payload(frame)
        except _Rejected as exc:
            return self._reject(session, frame, str(exc))
        with self._state:
            if not self.initialized:
                with self._rw.write():
                    np.copyto(self.params, values)
                self.initialized = True
                self._state.notify_all()
                self.log.emit("initialized", shard=self.shard, source_worker=frame.worker)
            version = self.version
            resume = self.policy.join(frame.worker) if frame.worker != NO_WORKER else 0
        # A worker (re)joining learns the clock to continue from.
        session.conn.send(Frame(Kind.PUSH_ACK, shard=self.shard, clock=version, meta={"resume_clock": resume}))

    def _on_push(self, session: Session, frame: Frame) -> None:
        try:
            grad = self._payload(frame)
        except _Rejected as exc:
            return self._reject(session, frame, str(exc))
        session.worker = frame.worker
        with self._state:
            while not self.initialized and not self.stopping:
                self._state.wait()
            try:
                update = self.policy.on_push(frame.worker, frame.clock, grad, time.monotonic())
            except SyncError as exc:
                return self._reject(session, frame, str(exc))
            staleness = self.version - session.data.get("pulled_version", 0)
            self.stats["pushes"] += 1
            self.stats["bytes_in"] += frame.payload_len
            self.stats["staleness_sum"] += staleness
            self.stats["staleness_max"] = max(self.stats["staleness_max"], staleness)
            if update is not None:
                self._apply(update)
            version = self.version
            hint = self.policy.hint_for(frame.worker)
            decisions = self.policy.drain_events()
        session.conn.send(Frame(Kind.PUSH_ACK, shard=self.shard, worker=frame.worker, seq=frame.seq,
                                clock=version, meta=None if hint is None else {"hint": hint}))
        self._log_decisions(decisions)

    def _log_decisions(self, decisions: list[tuple[str, dict]]) -> None:
        for name, fields in decisions:
            self.log.emit(name, shard=self.shard, **fields)

    def _apply(self, update: np.ndarray) -> None:
        """Caller holds ``_state``."""
        with self._rw.write():
            self.optimizer.step(self.params, update, lr_scale=self.policy.lr_scale())
            self.version += 1
        self._state.notify_all()
        if self._resume_reason is not None:
            self.log.emit("updates_resumed", shard=self.shard, after=self._resume_reason, version=self.version)
            self._resume_reason = None
        if self.checkpointer is not None and self.checkpointer.due(self.version):
            # Writers need _state, which we hold: the snapshot is a consistent state.
            arrays, scalars = self._state_arrays()
            self.checkpointer.snapshot(self.version, arrays, scalars)

    def _state_arrays(self) -> tuple[dict[str, np.ndarray], dict]:
        state = self.optimizer.state_dict()
        arrays = {"params": self.params, **{f"opt.{k}": v for k, v in state.items() if isinstance(v, np.ndarray)}}
        return arrays, {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}

    def restore(self, version: int, arrays: dict[str, np.ndarray], scalars: dict) -> None:
        """Resume from a checkpoint: parameters, optimizer state and version."""
        params = arrays.get("params")
        if params is None or params.shape != self.params.shape or params.dtype != self.params.dtype:
            raise ValueError(f"checkpoint holds {None if params is None else params.shape} parameters; "
                             f"shard {self.shard} holds {self.params.shape}")
        with self._state:
            np.copyto(self.params, params)
            self.optimizer.load_state_dict({**scalars, **{k.removeprefix("opt."): v for k, v in arrays.items()
                                                         if k.startswith("opt.")}})
            self.version = version
            self.initialized = True
            self._state.notify_all()
        self.log.emit("restored", shard=self.shard, version=version)

    def _on_pull(self, session: Session, frame: Frame) -> None:
        observer = frame.worker == NO_WORKER or frame.flags & Flag.ASYNC_PULL
        hint = (frame.meta or {}).get("hint")
        if hint is not None and not isinstance(hint, dict):
            return self._reject(session, frame, f"PULL hint must be a map, got {type(hint).__name__}")
        arrived = time.monotonic()
        with self._state:
            if frame.worker == NO_WORKER and not self.initialized:
                # An observer (the evaluator) must not hang on a server restarted empty.
                return self._reject(session, frame, f"shard {self.shard} holds no parameters yet")
            if not observer:
                try:
                    self.policy.on_pull(frame.worker, frame.clock, hint, arrived)
                except SyncError as exc:
                    return self._reject(session, frame, str(exc))
                self._state.notify_all()  # an arrival may have opened a barrier
            while not self.stopping and not (
                    self.initialized and (observer or self.policy.may_proceed(frame.worker, frame.clock))):
                self._state.wait()
            if not observer:
                self.wait_s[frame.worker] += time.monotonic() - arrived
            decisions = self.policy.drain_events()
            if self.stopping and frame.worker != NO_WORKER:
                session.conn.send(Frame(Kind.STOP, shard=self.shard))
                return
            # Never blocks here: writers hold _state, which we hold. Taking the read
            # lock before letting go of _state pins ``version`` to the bytes we send.
            self._rw.acquire_read()
            version = self.version
        self._log_decisions(decisions)
        try:
            session.conn.send(Frame(Kind.PARAMS, shard=self.shard, clock=version),
                              memoryview(self.params).cast("B"))
        finally:
            self._rw.release_read()
        session.data["pulled_version"] = version
        with self._state:
            self.stats["pulls"] += 1
            self.stats["bytes_out"] += self.nbytes

    def _on_done(self, session: Session, frame: Frame) -> None:
        session.data["left"] = True
        self._leave(frame.worker, "worker_left")
        session.conn.send(Frame(Kind.PUSH_ACK, shard=self.shard, clock=self.version))

    def _leave(self, worker: int, event: str) -> None:
        with self._state:
            update = self.policy.leave(worker, time.monotonic())
            if update is not None:
                self._apply(update)
            self._state.notify_all()
            decisions = self.policy.drain_events()
        self.log.emit(event, worker=worker, version=self.version)
        self._log_decisions(decisions)

    def on_disconnect(self, session: Session) -> None:
        if session.worker is not None and session.worker != NO_WORKER and not session.data.get("left"):
            with self._state:
                self._resume_reason = self._resume_reason or "worker_lost"
            self._leave(session.worker, "worker_lost")

    # --- lifecycle -----------------------------------------------------------------
    def stop_waiting(self) -> None:
        """The job is stopping: release every pull held at the gate."""
        with self._state:
            if not self.stopping:
                self.stopping = True
                self._state.notify_all()

    def snapshot_stats(self) -> dict:
        with self._state:
            pushes = self.stats["pushes"]
            return {"version": self.version, "initialized": self.initialized, **self.stats,
                    "wait_s": [round(w, 4) for w in self.wait_s],
                    **({f"checkpoint_{k}": v for k, v in self.checkpointer.stats.items()}
                       if self.checkpointer is not None else {}),
                    "staleness_mean": self.stats["staleness_sum"] / pushes if pushes else 0.0}


class _Rejected(Exception):
    """A well-formed frame whose content is refused; the connection stays open."""


def serve_until(server: ParameterServer, should_stop: threading.Event, stats_every_s: float = 1.0) -> None:
    """Log stats of a started server until ``should_stop`` is set, then close it."""
    server.log.emit("server_start", shard=server.shard, address=server.address, size=server.size,
                    policy=server.policy.name)
    last = time.monotonic()
    while not should_stop.wait(0.1):
        if time.monotonic() - last >= stats_every_s:
            server.log.emit("server_stats", shard=server.shard, **server.snapshot_stats())
            last = time.monotonic()
    server.log.emit("server_stop", shard=server.shard, **server.snapshot_stats())
    server.close()
