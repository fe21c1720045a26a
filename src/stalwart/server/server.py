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
import zlib
from collections import deque
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from ..metrics import EventLog
from ..sync import SyncError, SyncPolicy
from ..transport import NO_WORKER, Flag, Frame, Kind, ProtocolError
from ..transport.base import Listener
from ..transport.service import FrameService, Session
from .optim import ServerOptimizer
from .vector import all_finite

from ..recovery.chain import install_state
from ..recovery.stateless import RebuildWindow, flush_scale

if TYPE_CHECKING:
    from ..recovery import Checkpointer
    from ..recovery.chain import ChainReplica


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
        # When each update was applied (bounded): under BSP one update is one round.
        self._update_times: deque[float] = deque(maxlen=100_000)
        self.ltp = {"rounds": 0, "lost_sum": 0.0, "lost_max": 0.0, "resends": 0}
        self.wait_s = [0.0] * workers  # seconds each worker's pulls spent held at the gate
        self.checkpointer = checkpointer
        self.chain: "ChainReplica | None" = None
        self.rebuild: RebuildWindow | None = None  # stateless: how a fresh server finds its state
        self.flush_rule, self.flush_clip = "mean", 1.0
        # After a (re)start, a lost worker or a change of chain, the next applied update
        # is logged: the moment training through this shard resumed.
        self._resume_reason: str | None = "start"

    def attach_chain(self, chain: "ChainReplica") -> None:
        self.chain = chain
        # A whole-state transfer carries parameters, optimizer and policy arrays.
        self.max_payload = 6 * self.nbytes + (1 << 20)

    def attach_stateless(self, rebuild: RebuildWindow, flush_rule: str, flush_clip: float) -> None:
        flush_scale(flush_rule, self.params[:0], self.workers, 0, flush_clip)  # an unknown rule fails now
        self.rebuild, self.flush_rule, self.flush_clip = rebuild, flush_rule, flush_clip

    # --- wire ----------------------------------------------------------------------
    def payload_sink(self, session: Session, frame: Frame) -> memoryview | None:
        if frame.kind == Kind.STATE and self.chain is not None:
            return None  # a fresh buffer of the announced size (bounded by max_payload)
        if frame.kind not in (Kind.PUSH, Kind.INIT, Kind.REPLICATE, Kind.FLUSH):
            raise ProtocolError(f"{frame.kind.name} frames carry no payload here")
        if frame.shard != self.shard:
            raise ProtocolError(f"{frame.kind.name} for shard {frame.shard} sent to shard {self.shard}")
        buf = session.data.get("grad")
        if buf is None:
            buf = session.data["grad"] = np.empty(self.size, dtype=np.float32)
        return memoryview(buf).cast("B")

    def handle(self, session: Session, frame: Frame) -> None:
        if frame.kind in (Kind.PUSH, Kind.INIT, Kind.PULL, Kind.DONE, Kind.REPLICATE, Kind.STATE, Kind.FLUSH):
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
        elif frame.kind == Kind.FLUSH:
            self._on_flush(session, frame)
        elif self.chain is not None and frame.kind in (Kind.REPLICATE, Kind.REPLICATE_ACK, Kind.STATE):
            self._on_chain(session, frame)
        elif self.chain is not None and frame.kind == Kind.REQUEST and (frame.meta or {}).get("op") == "chain_join":
            self._on_join_request(session, frame)
        else:
            raise ProtocolError(f"a server does not accept {frame.kind.name} frames")

    def _payload(self, frame: Frame) -> np.ndarray:
        if frame.payload is None or frame.payload_len != self.nbytes:
            raise ProtocolError(f"{frame.kind.name} carries {frame.payload_len} bytes; "
                                f"shard {self.shard} holds {self.nbytes}")
        values = np.frombuffer(frame.payload, dtype=np.float32)
        if not all_finite(values):
            raise _Rejected(f"{frame.kind.name} from worker {frame.worker} holds NaN or infinite "
                            f"values; refused so that the shard stays intact")
        return values

    def _reject(self, session: Session, frame: Frame, reason: str, **meta) -> None:
        self.stats["rejected"] += 1
        self.log.emit("rejected", peer=session.conn.peer, worker=frame.worker, reason=reason)
        session.conn.send(Frame(Kind.ERROR, shard=self.shard, meta={"reason": reason, **meta}))

    def _not_head(self, session: Session, frame: Frame) -> bool:
        """With a chain, only its head takes workers' updates; others send them there."""
        if self.chain is None or self.chain.is_head():
            return False
        session.conn.send(Frame(Kind.ERROR, shard=self.shard, meta={
            "reason": f"server {self.chain.index} is not the head of shard {self.shard}'s chain",
            "redirect": True}))
        return True

    # --- the state machine: what every replica applies, in the same order -------------
    def _apply_init(self, worker: int, values: np.ndarray) -> int:
        """First offer wins; returns the clock the worker continues from. Holds _state."""
        if not self.initialized:
            with self._rw.write():
                np.copyto(self.params, values)
            self.initialized = True
            self._state.notify_all()
            self.log.emit("initialized", shard=self.shard, source_worker=worker)
        return self.policy.join(worker) if worker != NO_WORKER else 0

    def _apply_push(self, worker: int, clock: int, grad: np.ndarray, now: float,
                    pulled_version: int | None, hint: dict | None = None) -> int:
        """Account a push and apply what the policy returns; returns the version. Holds _state."""
        update = self.policy.on_push(worker, clock, grad, now, hint)
        self.stats["pushes"] += 1
        self.stats["bytes_in"] += grad.nbytes
        if pulled_version is not None:
            staleness = self.version - pulled_version
            self.stats["staleness_sum"] += staleness
            self.stats["staleness_max"] = max(self.stats["staleness_max"], staleness)
        if update is not None:
            self._apply(update)
        return self.version

    def _apply_leave(self, worker: int, now: float) -> None:
        """Holds _state."""
        update = self.policy.leave(worker, now)
        if update is not None:
            self._apply(update)
        self._state.notify_all()

    def _apply(self, update: np.ndarray) -> None:
        """Caller holds ``_state``."""
        with self._rw.write():
            self.optimizer.step(self.params, update, lr_scale=self.policy.lr_scale())
            self.version += 1
        self._update_times.append(time.monotonic())
        self._state.notify_all()
        self._note_resumed()
        if self.checkpointer is not None and self.checkpointer.due(self.version):
            # Writers need _state, which we hold: the snapshot is a consistent state.
            arrays, scalars = self.optimizer_state()
            self.checkpointer.snapshot(self.version, {"params": self.params, **{
                f"opt.{k}": v for k, v in arrays.items()}}, scalars)

    def _note_resumed(self) -> None:
        """An update was just applied; the first after a (re)start or a loss is an event.
        Holds _state."""
        if self._resume_reason is not None:
            self.log.emit("updates_resumed", shard=self.shard, after=self._resume_reason, version=self.version)
            self._resume_reason = None

    def optimizer_state(self) -> tuple[dict[str, np.ndarray], dict]:
        state = self.optimizer.state_dict()
        return ({k: v for k, v in state.items() if isinstance(v, np.ndarray)},
                {k: v for k, v in state.items() if not isinstance(v, np.ndarray)})

    def install(self, params: np.ndarray, opt_arrays: dict, opt_scalars: dict, version: int,
                initialized: bool = True) -> None:
        """Take over a whole state (a checkpoint, a chain's state transfer). Holds _state."""
        if params.shape != self.params.shape or params.dtype != self.params.dtype:
            raise ValueError(f"the state holds {params.shape} {params.dtype} parameters; "
                             f"shard {self.shard} holds {self.params.shape} {self.params.dtype}")
        with self._rw.write():
            np.copyto(self.params, params)
        self.optimizer.load_state_dict({**opt_scalars, **opt_arrays})
        self.version = version
        self.initialized = initialized
        self._state.notify_all()

    def restore(self, version: int, arrays: dict[str, np.ndarray], scalars: dict) -> None:
        """Resume from a checkpoint: parameters, optimizer state and version."""
        params = arrays.get("params")
        if params is None:
            raise ValueError(f"the checkpoint of shard {self.shard} holds no parameters")
        with self._state:
            self.install(params, {k.removeprefix("opt."): v for k, v in arrays.items() if k.startswith("opt.")},
                         scalars, version)
        self.log.emit("restored", shard=self.shard, version=version)

    # --- workers' requests -------------------------------------------------------------
    def _ack(self, session: Session, frame: Frame, version: int, meta: dict | None) -> Callable[[], None]:
        """The acknowledgement of a worker's request, to send now or once it is durable."""
        def send() -> None:
            try:
                session.conn.send(Frame(Kind.PUSH_ACK, shard=self.shard, worker=frame.worker, seq=frame.seq,
                                        clock=version, meta=meta))
            except (ConnectionError, OSError):
                pass  # the worker is gone; it will resend to whoever leads then
        return send

    def _replicate(self, op: str, frame: Frame, payload: np.ndarray | None, now: float,
                   waiter: Callable[[], None] | None, hint: dict | None = None) -> None:
        """Chain head: log an entry just applied and send it down. Holds _state."""
        chain = self.chain
        chain.last_lsn += 1
        entry = Frame(Kind.REPLICATE, shard=self.shard, worker=frame.worker, seq=chain.last_lsn,
                      clock=frame.clock, meta={"op": op, "wseq": frame.seq, "now": now,
                                               **({"hint": hint} if hint else {})})
        if op == "push":
            chain.dedupe[frame.worker] = [frame.seq, chain.last_lsn, self.version]
        chain.append(entry, None if payload is None else payload.tobytes(), waiter)
        chain.maybe_send_state()

    def _on_init(self, session: Session, frame: Frame) -> None:
        try:
            values = self._payload(frame)
        except _Rejected as exc:
            return self._reject(session, frame, str(exc))
        if self._not_head(session, frame):
            return
        offered = (frame.meta or {}).get("version")
        if offered is not None and (type(offered) is not int or offered < 0):
            return self._reject(session, frame, f"INIT version must be a non-negative integer, got {offered!r}")
        with self._state:
            if self.rebuild is not None and offered is not None:
                self._offer_for_rebuild(frame.worker, offered, frame.clock, values)
            resume = self._apply_init(frame.worker, values)
            if self.rebuild is not None and self.rebuild.offered:
                resume = max(resume, self.rebuild.max_clock + 1)  # after the furthest worker's clock
            # A worker (re)joining learns the clock to continue from.
            ack = self._ack(session, frame, self.version, {"resume_clock": resume})
            if self.chain is not None:
                return self._replicate("init", frame, values, time.time(), ack)
        ack()

    def _offer_for_rebuild(self, worker: int, version: int, clock: int, values: np.ndarray) -> None:
        """Stateless: a worker offers its copy; wait until the window closes, then the
        freshest copy offered becomes the shard (by whichever offer sees it close first).
        Holds _state."""
        rebuild = self.rebuild
        if self.initialized or (version == 0 and rebuild.best is None):
            return  # rebuilt already, or the job's start (first offer wins): nothing to choose
        rebuild.offer(f"worker {worker}", version, clock, values, time.monotonic(), worker=worker)
        self._state.notify_all()
        while not self.initialized and not self.stopping and rebuild.is_open:
            left = rebuild.time_left(time.monotonic())
            if left <= 0:
                with self._rw.write():
                    np.copyto(self.params, rebuild.best)
                self.version, self.initialized = rebuild.best_version, True
                rebuild.best = None  # the copy is the shard now
                self._state.notify_all()
                self.log.emit("rebuilt", shard=self.shard, version=self.version, source=rebuild.best_source,
                              offers=len(rebuild.offered), clock=rebuild.max_clock)
                return
            self._state.wait(left)

    def _on_flush(self, session: Session, frame: Frame) -> None:
        """Stateless: apply a worker's backlog (the summed change of its local steps)."""
        if self.rebuild is None:
            return self._reject(session, frame, "FLUSH needs stateless recovery; this server is not stateless")
        try:
            delta = self._payload(frame)
        except _Rejected as exc:
            return self._reject(session, frame, str(exc))
        meta = frame.meta or {}
        count, base = meta.get("count"), meta.get("base_version")
        if type(count) is not int or count < 0 or type(base) is not int or base < 0:
            return self._reject(session, frame, f"FLUSH needs integer count and base_version >= 0, "
                                                f"got {count!r} and {base!r}")
        with self._state:
            while not self.initialized and not self.stopping:
                self._state.wait()
            if not self.initialized:
                return self._reject(session, frame, f"shard {self.shard} holds no parameters to flush into")
            staleness = max(0, self.version - base)
            scale = flush_scale(self.flush_rule, delta, self.workers, staleness, self.flush_clip)
            with self._rw.write():
                self.params += np.float32(scale) * delta
                self.version += 1
            self._state.notify_all()
            version = self.version
            self._note_resumed()
        self.log.emit("flush_applied", shard=self.shard, worker=frame.worker, count=count, base_version=base,
                      staleness=staleness, scale=scale, rule=self.flush_rule, version=version)
        session.conn.send(Frame(Kind.PUSH_ACK, shard=self.shard, worker=frame.worker, clock=version,
                                meta={"staleness": staleness, "scale": scale}))

    def _on_push(self, session: Session, frame: Frame) -> None:
        try:
            grad = self._payload(frame)
        except _Rejected as exc:
            return self._reject(session, frame, str(exc))
        session.worker = frame.worker
        if (ltp := (frame.meta or {}).get("ltp")) is not None:
            self._note_ltp_round(frame.worker, ltp)
        hint = (frame.meta or {}).get("hint")
        if hint is not None and not isinstance(hint, dict):
            return self._reject(session, frame, f"PUSH hint must be a map, got {type(hint).__name__}")
        if self._not_head(session, frame):
            return
        with self._state:
            while not self.initialized and not self.stopping:
                self._state.wait()
            if self.chain is not None:
                seen = self.chain.dedupe.get(frame.worker)
                if seen is not None and seen[0] == frame.seq:
                    # A resend of a push we hold (the worker lost our predecessor as head).
                    return self.chain.wait_durable(seen[1], self._ack(session, frame, seen[2], None))
            now = time.time()  # wall time: a chain's head stamps it into the entry for every replica
            try:
                version = self._apply_push(frame.worker, frame.clock, grad, now,
                                           None if self.chain is not None else session.data.get("pulled_version", 0),
                                           hint)
            except SyncError as exc:
                return self._reject(session, frame, str(exc))
            advice = self.policy.hint_for(frame.worker)
            decisions = self.policy.drain_events()
            ack = self._ack(session, frame, version, None if advice is None else {"hint": advice})
            if self.chain is not None:
                self._replicate("push", frame, grad, now, ack, hint)
        if self.chain is None:
            ack()
        self._log_decisions(decisions)

    def _note_ltp_round(self, worker: int, ltp: dict) -> None:
        """Every loss-tolerant round is logged with the fraction of it that was lost."""
        self.log.emit("ltp_round", shard=self.shard, worker=worker, **ltp)
        with self._state:
            self.ltp["rounds"] += 1
            self.ltp["lost_sum"] += ltp["lost"]
            self.ltp["lost_max"] = max(self.ltp["lost_max"], ltp["lost"])
            self.ltp["resends"] += ltp["resends"]

    def round_stats(self) -> dict:
        """Intervals between consecutive updates (BSP: the synchronization round time)."""
        with self._state:
            times = np.fromiter(self._update_times, dtype=np.float64)
            ltp = dict(self.ltp)
        gaps = np.diff(times) * 1000
        out = {"update_ms_mean": float(gaps.mean()) if gaps.size else None,
               "update_ms_p50": float(np.percentile(gaps, 50)) if gaps.size else None,
               "update_ms_p99": float(np.percentile(gaps, 99)) if gaps.size else None,
               "update_intervals": int(gaps.size)}
        if ltp["rounds"]:
            out.update(ltp_rounds=ltp["rounds"], ltp_lost_mean=ltp["lost_sum"] / ltp["rounds"],
                       ltp_lost_max=ltp["lost_max"], ltp_resends=ltp["resends"])
        return out

    def _log_decisions(self, decisions: list[tuple[str, dict]]) -> None:
        for name, fields in decisions:
            self.log.emit(name, shard=self.shard, **fields)

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
                    self.policy.on_pull(frame.worker, frame.clock, hint, time.time())
                except SyncError as exc:
                    return self._reject(session, frame, str(exc))
                self._state.notify_all()  # an arrival may have opened a barrier
            while not self.stopping and not (
                    self.initialized and self._has_own_push(frame)
                    and (observer or self.policy.may_proceed(frame.worker, frame.clock))):
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

    def _has_own_push(self, frame: Frame) -> bool:
        """Read your writes: on a chain's tail, a pull that follows a push waits until that
        push has come down the chain (on one server, the connection's order ensures it)."""
        if self.chain is None or not frame.flags & Flag.AFTER_PUSH or self.chain.mode != "strong":
            return True
        seen = self.chain.dedupe.get(frame.worker)
        return seen is not None and seen[0] == frame.seq

    def _on_done(self, session: Session, frame: Frame) -> None:
        session.data["left"] = True
        self._leave(session, frame, "worker_left")
        session.conn.send(Frame(Kind.PUSH_ACK, shard=self.shard, clock=self.version))

    def _leave(self, session: Session, frame: Frame, event: str) -> None:
        if self.chain is not None and not self.chain.is_head():
            return  # only the head decides membership; its entry reaches every replica
        with self._state:
            now = time.time()  # wall time: a chain's head stamps it into the entry for every replica
            self._apply_leave(frame.worker, now)
            if self.chain is not None:
                self._replicate("leave", frame, None, now, None)
            decisions = self.policy.drain_events()
        self.log.emit(event, worker=frame.worker, version=self.version)
        self._log_decisions(decisions)

    def on_disconnect(self, session: Session) -> None:
        if self.chain is not None and session.data.get("successor"):
            self.chain.successor_lost(session.conn)
        if session.worker is not None and session.worker != NO_WORKER and not session.data.get("left"):
            with self._state:
                self._resume_reason = self._resume_reason or "worker_lost"
            self._leave(session, Frame(Kind.DONE, shard=self.shard, worker=session.worker), "worker_lost")

    # --- chain replication: entries from our predecessor, acks from our successor -------
    def _on_chain(self, session: Session, frame: Frame) -> None:
        chain = self.chain
        if frame.kind == Kind.REPLICATE_ACK:
            return chain.on_ack(frame.seq)
        if frame.kind == Kind.STATE:
            with self._state:
                lsn, dedupe = install_state(self, frame.meta or {}, frame.payload)
                chain.last_lsn, chain.dedupe = lsn, dedupe
                chain.forward_state(frame, bytes(frame.payload))
            self.log.emit("state_installed", shard=self.shard, version=self.version, lsn=lsn)
            return
        meta = frame.meta or {}
        op, lsn = meta.get("op"), frame.seq

        def ack_upstream() -> None:
            try:
                session.conn.send(Frame(Kind.REPLICATE_ACK, shard=self.shard, seq=lsn))
            except (ConnectionError, OSError):
                pass  # our predecessor died; its predecessor will resend to us
        with self._state:
            if lsn <= chain.last_lsn:
                return chain.wait_durable(lsn, ack_upstream)  # a resend after a repair
            if lsn != chain.last_lsn + 1:
                raise ProtocolError(f"chain entry {lsn} after {chain.last_lsn}: entries are missing")
            now = float(meta.get("now", 0.0))
            payload = None
            if op in ("push", "init"):
                payload = np.frombuffer(frame.payload, dtype=np.float32)
            try:
                if op == "push":
                    self._apply_push(frame.worker, frame.clock, payload, now, None, meta.get("hint"))
                    chain.dedupe[frame.worker] = [meta.get("wseq"), lsn, self.version]
                elif op == "init":
                    self._apply_init(frame.worker, payload)
                elif op == "leave":
                    self._apply_leave(frame.worker, now)
                else:
                    raise ProtocolError(f"unknown chain entry {op!r}")
            except SyncError as exc:
                # Replicas apply the head's log in the head's order; a refusal here
                # means the states diverged. Say so loudly; the entry still counts.
                self.log.emit("chain_diverged", shard=self.shard, lsn=lsn, reason=str(exc))
            chain.last_lsn = lsn
            self._state.notify_all()  # a pull may wait for this very push (read your writes)
            decisions = self.policy.drain_events()
            chain.append(frame, None if payload is None else payload.tobytes(), ack_upstream)
        self._log_decisions(decisions)

    def _on_join_request(self, session: Session, frame: Frame) -> None:
        index = (frame.meta or {}).get("index")
        reason = self.chain.can_adopt()
        if reason is not None or type(index) is not int:
            session.conn.send(Frame(Kind.ERROR, shard=self.shard, meta={
                "reason": reason or "chain_join needs an integer index", "retry": True}))
            return
        session.data["successor"] = True
        self.chain.adopt_joiner(index, session.conn)

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
                    **({"chain_lsn": self.chain.last_lsn} if self.chain is not None else {}),
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
    with server._state:
        # A fingerprint of the final state: replicas of a chain must agree bit for bit.
        digest = zlib.crc32(memoryview(server.params).cast("B"))
    server.log.emit("server_stop", shard=server.shard, params_crc32=digest, **server.snapshot_stats(),
                    **server.round_stats())
    server.close()
