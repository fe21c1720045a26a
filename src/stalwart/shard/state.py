"""One shard's whole state, and the one place where it changes.

A :class:`ShardState` owns the shard's parameters (one contiguous float32 buffer), its
version (updates applied so far), its optimizer and its sync policy, and the locks
that guard them. Everything that changes it is one *log entry* applied by one method:

=============  ==============================================================
``init``       a worker offers parameters (the first offer wins) and (re)joins
``push``       a worker's gradient for a clock; the policy decides what to apply
``leave``      a worker left (or was lost); its absence may complete a barrier
``flush``      a stateless worker's backlog, added outside the optimizer
``merge``      the workers' backlogs at once, as one outer optimizer step
=============  ==============================================================

These are deterministic given the entry (a chain's head stamps the wall time into
it), so replicas fed the same entries in the same order hold the same state. The
server decides who may send what; recovery strategies decide how the entries and the
state survive (:mod:`stalwart.recovery`); both act on the shard only through this class.

Concurrency: ``lock`` (a condition) guards everything here and is held while an entry
is applied; ``rw`` lets many pulls read the buffer while no update writes it, so
parameters go out without a copy and never half-updated. Lock order: ``lock`` -> ``rw``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

import numpy as np

from ..metrics import EventLog
from ..optim import ServerOptimizer, all_finite
from ..sync import SyncPolicy
from ..transport import NO_WORKER, Frame, ProtocolError
from ..transport.service import Refused
from .rwlock import ReadWriteLock
from .snapshot import Snapshot, SnapshotError


class ShardState:
    def __init__(self, shard: int, size: int, optimizer: ServerOptimizer, policy: SyncPolicy, workers: int,
                 log: EventLog):
        self.shard, self.size, self.workers = shard, size, workers
        self.optimizer, self.policy, self.log = optimizer, policy, log
        self.params = np.zeros(size, dtype=np.float32)
        self.nbytes = self.params.nbytes
        self.version = 0
        self.initialized = False
        self.stopping = False
        self.lock = threading.Condition()
        self.rw = ReadWriteLock()
        self.stats = {"pushes": 0, "pulls": 0, "bytes_in": 0, "bytes_out": 0, "rejected": 0,
                      "staleness_sum": 0, "staleness_max": 0}
        # When each update was applied (bounded): under BSP one update is one round.
        self.update_times: deque[float] = deque(maxlen=100_000)
        # Run after every update (lock held): a checkpointer's chance to snapshot.
        self.after_update: list[Callable[["ShardState"], None]] = []
        # After a (re)start, a lost worker or a change of chain, the next update applied
        # is logged: the moment training through this shard resumed.
        self._resume_reason: str | None = "start"

    # --- what a payload must be --------------------------------------------------------
    def checked(self, frame: Frame) -> np.ndarray:
        """The frame's payload as this shard's values: exactly its size, all finite."""
        if frame.payload is None or frame.payload_len != self.nbytes:
            raise ProtocolError(f"{frame.kind.name} carries {frame.payload_len} bytes; "
                                f"shard {self.shard} holds {self.nbytes}")
        values = np.frombuffer(frame.payload, dtype=np.float32)
        if not all_finite(values):
            raise Refused(f"{frame.kind.name} from worker {frame.worker} holds NaN or infinite "
                          f"values; refused so that the shard stays intact")
        return values

    # --- the log entries (each with ``lock`` held) --------------------------------------
    def apply_init(self, worker: int, values: np.ndarray) -> int:
        """First offer wins; returns the clock the worker continues from."""
        if not self.initialized:
            with self.rw.write():
                np.copyto(self.params, values)
            self.initialized = True
            self.lock.notify_all()
            self.log.emit("initialized", shard=self.shard, source_worker=worker)
        return self.policy.join(worker) if worker != NO_WORKER else 0

    def apply_push(self, worker: int, clock: int, grad: np.ndarray, now: float,
                   pulled_version: int | None = None, hint: dict | None = None) -> int:
        """Account a push and apply what the policy returns; returns the version."""
        update = self.policy.on_push(worker, clock, grad, now, hint)
        self.stats["pushes"] += 1
        self.stats["bytes_in"] += grad.nbytes
        if pulled_version is not None:
            staleness = self.version - pulled_version
            self.stats["staleness_sum"] += staleness
            self.stats["staleness_max"] = max(self.stats["staleness_max"], staleness)
        if update is not None:
            self._step(update)
        return self.version

    def apply_leave(self, worker: int, now: float) -> None:
        update = self.policy.leave(worker, now)
        if update is not None:
            self._step(update)
        self.lock.notify_all()

    def apply_flush(self, delta: np.ndarray, scale: float) -> int:
        """``params += scale * delta``, outside the optimizer's moments (see
        :mod:`stalwart.recovery.stateless` for why); returns the version."""
        with self.rw.write():
            self.params += np.float32(scale) * delta
        self._updated()
        return self.version

    def apply_merge(self, outer: ServerOptimizer, pseudo_grad: np.ndarray) -> int:
        """One step of an outer optimizer (the stateless ``outer`` rule) on the merged
        backlogs, beside the shard's own optimizer, whose state it leaves alone."""
        with self.rw.write():
            outer.step(self.params, pseudo_grad)
        self._updated()
        return self.version

    def _step(self, update: np.ndarray) -> None:
        """The optimizer applies what the policy returned (a push's, or a leave's)."""
        with self.rw.write():
            self.optimizer.step(self.params, update, lr_scale=self.policy.lr_scale())
        self._updated()

    def _updated(self) -> None:
        self.version += 1
        self.update_times.append(time.monotonic())
        self.lock.notify_all()
        if self._resume_reason is not None:
            self.log.emit("updates_resumed", shard=self.shard, after=self._resume_reason, version=self.version)
            self._resume_reason = None
        for hook in self.after_update:
            hook(self)

    def note_interruption(self, why: str) -> None:
        """Training through this shard was interrupted (a worker lost, the chain changed):
        the next update is logged as the moment it resumed. Takes ``lock``."""
        with self.lock:
            self._resume_reason = self._resume_reason or why

    def log_decisions(self, decisions: list[tuple[str, dict]]) -> None:
        """Log what the policy decided (drained under ``lock``, logged outside it)."""
        for name, fields in decisions:
            self.log.emit(name, shard=self.shard, **fields)

    # --- the whole state ----------------------------------------------------------------
    def snapshot(self, policy: bool = True) -> Snapshot:
        """The state as views of the live arrays: valid while ``lock`` is held, so the
        caller copies or encodes it before letting go. ``policy=False`` leaves the sync
        policy out (a checkpoint: see :mod:`stalwart.shard.snapshot`)."""
        arrays: dict[str, np.ndarray] = {"params": self.params}
        scalars: dict = {}
        parts = {"opt": ("optimizer", self.optimizer)} | ({"policy": ("policy", self.policy)} if policy else {})
        for prefix, (name, part) in parts.items():
            state = part.state_dict()
            arrays.update({f"{prefix}.{k}": v for k, v in state.items() if isinstance(v, np.ndarray)})
            scalars[name] = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
        return Snapshot(self.shard, self.version, self.initialized, arrays, scalars)

    def restore(self, snap: Snapshot) -> None:
        """Install what ``snap`` holds (``lock`` held); the parts it leaves out stay as they are."""
        params = snap.arrays.get("params")
        if snap.shard != self.shard:
            raise SnapshotError(f"the state of shard {snap.shard} cannot be installed into shard {self.shard}")
        if params is None or params.shape != self.params.shape or params.dtype != self.params.dtype:
            raise SnapshotError(f"the state holds {None if params is None else (params.shape, str(params.dtype))} "
                                f"parameters; shard {self.shard} holds {self.params.shape} float32")
        with self.rw.write():
            np.copyto(self.params, params)
        if (opt := snap.section("opt")) is not None:
            self.optimizer.load_state_dict(opt)
        if (policy := snap.section("policy")) is not None:
            self.policy.load_state_dict(policy)
        self.version, self.initialized = snap.version, snap.initialized
        self.lock.notify_all()

    # --- waiting ------------------------------------------------------------------------
    def wait_initialized(self) -> bool:
        """Wait (``lock`` held) until the shard holds parameters or the job stops."""
        while not self.initialized and not self.stopping:
            self.lock.wait()
        return self.initialized

    def stop_waiting(self) -> None:
        """The job is stopping: release everything waiting on the shard."""
        with self.lock:
            if not self.stopping:
                self.stopping = True
                self.lock.notify_all()

    def update_intervals(self) -> dict:
        """Intervals between consecutive updates (BSP: the synchronization round time)."""
        with self.lock:
            times = np.fromiter(self.update_times, dtype=np.float64)
        gaps = np.diff(times) * 1000
        return {"update_ms_mean": float(gaps.mean()) if gaps.size else None,
                "update_ms_p50": float(np.percentile(gaps, 50)) if gaps.size else None,
                "update_ms_p99": float(np.percentile(gaps, 99)) if gaps.size else None,
                "update_intervals": int(gaps.size)}
