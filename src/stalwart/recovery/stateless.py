"""Stateless servers: workers train through a server failure and rebuild the server.

This module is the server's side (the rebuild window, the flush rules, the strategy);
the workers' side, training through and owing backlogs, is
:mod:`stalwart.worker.trainthrough`.

A server here holds nothing that the workers do not hold too: every worker has a copy
of the parameters it last pulled, tagged with the version it was pulled at. So when a
shard's server dies, nothing is lost for good, and nobody needs to stop:

1. **Detach.** A worker whose connection to a shard breaks keeps training, on its own
   copy of the whole model (why the whole: ``TrainThrough``). It applies its own
   updates locally (the job's optimizer rule) and adds the change it made to each
   shard to that shard's backlog: a running sum and a count, never a list, so
   its memory is fixed (the base copy, the sum and the local optimizer state: three
   shard-sized vectors) however long the outage lasts. The backlog is bounded in count
   (``backlog_max`` local steps, the most stale work a worker may owe); when it is full
   the worker either *waits* for the server (stops computing) or *drops* (trains on
   locally without owing more: that progress stays in its own copy only).
2. **Rebuild.** A fresh server process starts empty. Each reattaching worker offers
   its base copy with its version; the server collects offers for a short window (or
   until every worker has offered) and takes the highest version, or its own last
   snapshot if that is newer (:class:`RebuildWindow`). Everything up to that version
   survives; what was acknowledged after it is the loss, and is measured.
3. **Flush.** Each worker then sends each backlog as one ``FLUSH`` frame: the summed
   change and how many local steps it holds. The server applies it as a correction,
   ``params += scale * delta``, outside the optimizer's moments (momentum fed with a
   sum of hundreds of steps would repeat it ~1/(1-beta) times), with ``scale`` chosen
   by the flush rule (:func:`flush_scale`). The worker pulls the merged parameters and
   goes back to normal steps. Or, with the ``outer`` rule, the server collects the
   workers' backlogs for a window and applies them at once as one step of an *outer
   optimizer*, as DiLoCo does (Douillard et al. 2023, and torchft's ``LocalSGD``/
   ``DiLoCo``): the sample-weighted mean of the workers' changes is a pseudo-gradient
   (``-mean``) fed to SGD with Nesterov momentum (``outer_lr`` 0.7, ``outer_momentum``
   0.9 by default). With a fresh momentum buffer that first step moves the shard by
   ``outer_lr * (1 + outer_momentum)`` = 1.33 times the mean change; the buffer then
   persists in this server process from one outage to the next (a restarted server
   starts a fresh one), so a second outage's merge also carries 0.9 of the first's.
   What the merge never touches, under any rule: the shard's own optimizer state
   (SGD's momentum, Adam's moments), which the workers' pushes go on feeding after the
   merge, from where the shard stood before it (a rebuilt shard's optimizer starts
   fresh, since it was not in the workers' copies).
4. **Refuse what would blow up.** A flush whose change is not finite is refused by
   name (the payload check); one whose L2 norm exceeds ``flush_max_ratio`` times the
   shard's own norm is refused too, and in both cases the shard is left untouched.

Why deltas and not gradients: a delta is the progress a worker really made, whatever
its optimizer, so ``sum`` reproduces a worker's own local model exactly on top of its
base, and the rules below have plain meanings.
"""

from __future__ import annotations

import enum
import math
import time

import numpy as np

from ..optim import build_optimizer
from ..shard import Snapshot
from ..transport import Frame, Kind
from ..transport.service import Refused, Session
from .base import RecoveryStrategy
from .checkpoint import Checkpointer


class FlushRule(enum.StrEnum):
    """How a server applies a flushed backlog (:func:`flush_scale`; ``outer``: :class:`OuterMerge`)."""
    SUM = "sum"
    MEAN = "mean"
    STALENESS = "staleness"
    CLIP = "clip"
    OUTER = "outer"

    @classmethod
    def parse(cls, rule: "FlushRule | str") -> "FlushRule":
        try:
            return cls(rule)
        except ValueError:
            raise ValueError(f"unknown flush rule {rule!r}; choose one of {[r.value for r in cls]}") from None


def flush_scale(rule: "FlushRule | str", delta: np.ndarray, workers: int, staleness: int, clip_norm: float) -> float:
    """The factor a server applies a flushed backlog with (``params += factor * delta``).

    * ``sum``: 1. Every worker's whole local progress is added; with N workers that
      trained through the outage the server moves N times as far as one of them.
    * ``mean``: 1/N. All N flushes together move the server by the mean of the
      workers' local progress: model averaging of the copies that trained apart.
    * ``staleness``: 1/(1 + staleness), the staleness-aware rate of Zhang et al. (2016):
      ``staleness`` is how many updates the server applied between the version the
      backlog was built on and this flush, so later, staler flushes count less.
    * ``clip``: as ``mean``, with the result's L2 norm clipped to ``clip_norm``.
    """
    rule = FlushRule.parse(rule)
    if rule == FlushRule.OUTER:
        raise ValueError("the outer rule merges all backlogs at once (OuterMerge), not one by one")
    if rule == FlushRule.SUM:
        return 1.0
    if rule == FlushRule.MEAN:
        return 1.0 / max(1, workers)
    if rule == FlushRule.STALENESS:
        return 1.0 / (1.0 + max(0, staleness))
    scale = 1.0 / max(1, workers)  # clip
    norm = scale * float(np.linalg.norm(delta.astype(np.float64, copy=False)))
    return scale * min(1.0, clip_norm / norm) if norm > 0 else scale


class WorkerWindow:
    """A window over what the workers send: open from ``opened`` until ``window_s``
    later, or until every one of ``workers`` has sent (``offered``)."""

    def __init__(self, workers: int, window_s: float):
        self.workers, self.window_s = workers, window_s
        self.opened: float | None = None
        self.offered: set[int] = set()

    @property
    def is_open(self) -> bool:
        return self.opened is not None

    def time_left(self, now: float) -> float:
        if self.opened is None:
            return math.inf
        if len(self.offered) >= self.workers:
            return 0.0
        return self.opened + self.window_s - now


class RebuildWindow(WorkerWindow):
    """A fresh server's choice of where to start: the freshest copy offered in a window.

    The window opens with a worker's first offer of a version above 0 (or any offer
    once the server's own snapshot is a candidate) and closes
    ``window_s`` later, or as soon as every worker has offered. Ties go to the earliest
    offer. Offers are copied (the sender's buffer is reused for its next frame).
    """

    def __init__(self, workers: int, window_s: float):
        super().__init__(workers, window_s)
        self.best_version = -1
        self.best_source: str | None = None
        self.best: np.ndarray | None = None
        self.max_clock = 0

    def offer(self, source: str, version: int, clock: int, values: np.ndarray, now: float,
              worker: int | None = None) -> None:
        if self.opened is None and worker is not None and (version > 0 or self.best is not None):
            self.opened = now  # a worker's copy of a trained shard, or one to weigh against a snapshot
        if worker is not None:
            self.offered.add(worker)
        self.max_clock = max(self.max_clock, clock)
        if version > self.best_version:
            self.best_version, self.best_source = version, source
            self.best = values.copy()


class OuterMerge(WorkerWindow):
    """The ``outer`` rule: backlogs collected for a window, then one outer-optimizer step.

    ``add`` takes a worker's backlog (``delta``: the change its ``count`` local steps
    made); the window opens with the first and closes ``window_s`` later or as soon as
    ``workers`` backlogs are in. Then :meth:`pseudo_gradient` is minus their mean,
    weighted by the local steps (the samples, at a fixed batch) each holds, and the
    outer optimizer (SGD with Nesterov momentum) takes one step with it.
    """

    def __init__(self, workers: int, window_s: float, lr: float, momentum: float):
        super().__init__(workers, window_s)
        self.lr, self.momentum = lr, momentum
        self.optimizer = None   # made at the first merge: its momentum lives from merge to merge
        self.pending: list[tuple[int, np.ndarray, int]] = []
        self.merges = 0         # merges applied; a waiter knows its backlog is in by this moving on

    def add(self, worker: int, delta: np.ndarray, count: int, now: float) -> int:
        """Queue a backlog (copied); returns the merge number it will be part of."""
        if self.opened is None:
            self.opened = now
        self.offered.add(worker)
        self.pending.append((worker, delta.copy(), count))
        return self.merges

    def pseudo_gradient(self) -> np.ndarray | None:
        """Minus the step-weighted mean change of the pending backlogs (None: no steps)."""
        weights = np.array([count for _, _, count in self.pending], dtype=np.float64)
        if not weights.sum() > 0:
            return None
        mean = sum(np.float64(w / weights.sum()) * d.astype(np.float64) for w, (_, d, _) in zip(weights, self.pending))
        return (-mean).astype(np.float32)

    def close(self, size: int):
        """The window is over: (the outer optimizer, the pseudo-gradient or None, how
        many backlogs it merges); the pending backlogs are taken."""
        if self.optimizer is None:
            self.optimizer = build_optimizer("sgd", size, lr=self.lr, momentum=self.momentum, nesterov=True)
        grad, merged = self.pseudo_gradient(), len(self.pending)
        self.pending, self.opened, self.offered = [], None, set()
        self.merges += 1
        return self.optimizer, grad, merged


class StatelessRecovery(RecoveryStrategy):
    """The server's side of stateless recovery: rebuild from the workers' offers (and
    its own snapshot, with ``checkpointer``), then take their backlogs as FLUSH frames."""

    name = "stateless"
    owns = frozenset({Kind.FLUSH})

    def __init__(self, window: RebuildWindow, rule: FlushRule | str, clip: float,
                 checkpointer: Checkpointer | None = None, *, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 max_ratio: float = 10.0):
        self.window, self.rule, self.clip = window, FlushRule.parse(rule), clip
        self.checkpointer = checkpointer
        self.max_ratio = max_ratio
        self.merge = OuterMerge(window.workers, window.window_s, outer_lr, outer_momentum) \
            if self.rule == FlushRule.OUTER else None

    def bind(self, shard, serve, log) -> None:
        super().bind(shard, serve, log)
        if self.checkpointer is not None:
            self.checkpointer.watch(shard)

    def recover(self) -> None:
        snap = self.checkpointer.load_newest() if self.checkpointer is not None else None
        if snap is not None:  # a candidate among the workers' copies, not the state itself
            self.window.offer("snapshot", snap.version, 0, snap.arrays["params"], time.monotonic())

    def init(self, frame: Frame, values: np.ndarray, offered_version: int | None) -> int:
        if offered_version is not None:
            self._offer(frame.worker, offered_version, frame.clock, values)
        resume = self.shard.apply_init(frame.worker, values)
        if self.window.offered:
            resume = max(resume, self.window.max_clock + 1)  # after the furthest worker's clock
        return resume

    def _offer(self, worker: int, version: int, clock: int, values: np.ndarray) -> None:
        """A worker offers its copy; wait until the window closes, then the freshest copy
        offered becomes the shard (by whichever offer sees it close first). Lock held."""
        shard, window = self.shard, self.window
        if shard.initialized or (version == 0 and window.best is None):
            return  # rebuilt already, or the job's start (first offer wins): nothing to choose
        window.offer(f"worker {worker}", version, clock, values, time.monotonic(), worker=worker)
        shard.lock.notify_all()
        while not shard.initialized and not shard.stopping and window.is_open:
            left = window.time_left(time.monotonic())
            if left <= 0:
                shard.restore(Snapshot(shard.shard, window.best_version, True, {"params": window.best}))
                window.best = None  # the copy is the shard now
                self.log.emit("rebuilt", shard=shard.shard, version=shard.version, source=window.best_source,
                              offers=len(window.offered), clock=window.max_clock)
                return
            shard.lock.wait(left)

    def on_frame(self, session: Session, frame: Frame) -> None:
        """FLUSH: apply a worker's backlog (the summed change of its local steps)."""
        shard = self.shard
        delta = shard.checked(frame)
        meta = frame.meta or {}
        count, base = meta.get("count"), meta.get("base_version")
        if type(count) is not int or count < 0 or type(base) is not int or base < 0:
            raise Refused(f"FLUSH needs integer count and base_version >= 0, got {count!r} and {base!r}")
        with shard.lock:
            if not shard.wait_initialized():
                raise Refused(f"shard {shard.shard} holds no parameters to flush into")
            self._check_size(frame.worker, delta)
            staleness = max(0, shard.version - base)
            if self.merge is not None:
                version, scale = self._merged(frame.worker, delta, count), None
            else:
                scale = flush_scale(self.rule, delta, shard.workers, staleness, self.clip)
                version = shard.apply_flush(delta, scale)
        self.log.emit("flush_applied", shard=shard.shard, worker=frame.worker, count=count, base_version=base,
                      staleness=staleness, scale=scale, rule=self.rule.value, version=version)
        session.conn.send(Frame(Kind.ACK, shard=shard.shard, worker=frame.worker, clock=version,
                                meta={"staleness": staleness, "scale": scale}))

    def _check_size(self, worker: int, delta: np.ndarray) -> None:
        """Refuse a change far larger than the shard itself (lock held): applied, it
        would replace the model rather than correct it."""
        norm = float(np.linalg.norm(delta.astype(np.float64, copy=False)))
        own = float(np.linalg.norm(self.shard.params.astype(np.float64, copy=False)))
        if own > 0 and norm > self.max_ratio * own:
            raise Refused(f"FLUSH from worker {worker}: its change has L2 norm {norm:.3g}, more than "
                          f"{self.max_ratio:g}x shard {self.shard.shard}'s own ({own:.3g}); refused, "
                          f"the shard is untouched")

    def _merged(self, worker: int, delta: np.ndarray, count: int) -> int:
        """Queue this backlog for the outer merge and wait (lock held) until the merge it
        is part of has been applied, by whichever flush closes the window; returns the
        version after it."""
        shard, merge = self.shard, self.merge
        mine = merge.add(worker, delta, count, time.monotonic())
        shard.lock.notify_all()
        while merge.merges == mine and not shard.stopping:
            left = merge.time_left(time.monotonic())
            if left <= 0:
                outer, grad, merged = merge.close(shard.size)
                if grad is not None:
                    shard.apply_merge(outer, grad)
                    self.log.emit("merged", shard=shard.shard, rule="outer", lr=merge.lr, momentum=merge.momentum,
                                  backlogs=merged, version=shard.version,
                                  pseudo_grad_norm=round(float(np.linalg.norm(grad)), 6))
                shard.lock.notify_all()
                break
            shard.lock.wait(left)
        return shard.version

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()

    def stats(self) -> dict:
        return self.checkpointer.prefixed_stats() if self.checkpointer is not None else {}
