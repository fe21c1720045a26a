"""The synchronization-policy interface, evaluated by every server on its own shard.

A policy answers two questions and nothing else:

* ``on_push``: a worker pushed its gradient for ``clock``; is there an update to apply
  now (and which), or is the gradient held until others arrive?
* ``may_proceed``: a worker that pushed ``clock`` asks for parameters to begin the
  next clock; may it have them now, or must it wait?

The server owns locking, the optimizer and the wire; a policy is plain, single-threaded
bookkeeping with the time passed in (``now``), which keeps each policy small and
testable without processes or clocks.

Agreement between shards. Clock-based rules (BSP, ASP, SSP) are deterministic functions
of the pushes, so every shard, seeing the same pushes, gates the same way. Rules that
depend on *timing* (DSSP, ElasticBSP) would not agree: each shard sees pushes at
slightly different instants. For those, shard 0 is the *leader*: it alone decides, and
its decision travels as a small *hint* in its push acknowledgement to the worker, which
relays the hint on its next pushes and pulls to every shard. Followers act on the
relayed hint, so all shards of a job hold a worker at the same barrier. Whatever a
hint changes in a policy's state arrives with a push (``on_push``), never with a pull
(``on_pull`` only decides whether that pull waits): pushes are what a chain of
replicas replicates, so every replica of a shard keeps the same policy state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class SyncError(ValueError):
    """A push that the policy cannot accept (e.g. a clock from the past under BSP)."""


class SyncPolicy(ABC):
    name: str = "?"

    def __init__(self, workers: int, shard_size: int, leader: bool = True):
        self.workers = workers
        self.active: set[int] = set(range(workers))
        self.shard_size = shard_size
        self.leader = leader
        self.clocks: dict[int, int] = {}  # last clock each worker pushed
        self._events: list[tuple[str, dict]] = []

    @abstractmethod
    def on_push(self, worker: int, clock: int, grad: np.ndarray, now: float = 0.0,
                hint: dict | None = None) -> np.ndarray | None:
        """Account a push (with the hint the worker relays); return the gradient to apply
        now, or None to hold it."""

    @abstractmethod
    def may_proceed(self, worker: int, clock: int) -> bool:
        """May ``worker``, having pushed ``clock``, pull and begin ``clock + 1``?"""

    def on_pull(self, worker: int, clock: int, hint: dict | None, now: float = 0.0) -> None:
        """A pull for ``clock`` arrived carrying the hint the worker relays (if any); it
        may only set what this pull waits for."""

    def hint_for(self, worker: int) -> dict | None:
        """What the leader asks ``worker`` to relay to every shard, or None."""
        return None

    def join(self, worker: int) -> int:
        """``worker`` (re)joins the job: wait for it again; returns the clock it pushes next.

        A worker that was not being waited for (a newcomer, or one back after it left or
        was lost) continues from the slowest other active worker's clock, never behind
        it, so that no bound on how far workers may run apart makes the others wait while
        it catches up. One of the job's first workers, waited for from the start,
        begins where it is: at clock 0."""
        waited_for = worker in self.active
        others = [self.clocks.get(w, -1) for w in self.active if w != worker]
        self.active.add(worker)
        own = self.clocks.get(worker, -1)
        start = own + 1 if waited_for else max(own, min(others, default=-1)) + 1
        if start > 0:
            self.clocks[worker] = start - 1  # as if it had pushed up to there
        return start

    def lr_scale(self) -> float:
        """Scale of the learning rate for the update just returned by ``on_push``.

        One configured learning rate must mean the same thing under every policy: BSP
        applies the mean of N gradients per update, so a policy that applies single
        gradients scales its step by 1/N to move the model as far per N pushes.
        """
        return 1.0

    def leave(self, worker: int, now: float = 0.0) -> np.ndarray | None:
        """``worker`` left the job; return an update that its absence completes, if any."""
        self.active.discard(worker)
        return None

    def drain_events(self) -> list[tuple[str, dict]]:
        """Decisions worth a line in the event log (barriers placed and reached)."""
        events, self._events = self._events, []
        return events

    def state_dict(self) -> dict:
        """Everything this policy decides from, declared: plain values (msgpack-able, int
        keys allowed) and NumPy arrays. A chain's state transfer and a checkpoint carry
        exactly this; what the job configured (workers, leader, bounds) is not state, and
        neither are the events not yet drained. Subclasses extend both methods."""
        return {"active": sorted(self.active), "clocks": dict(self.clocks)}

    def load_state_dict(self, state: dict) -> None:
        self.active = {int(w) for w in state["active"]}
        self.clocks = {int(w): int(c) for w, c in state["clocks"].items()}

    def _slowest_clock(self) -> int:
        """The last clock pushed by the slowest active worker (-1 before its first push)."""
        return min((self.clocks.get(w, -1) for w in self.active), default=-1)


class ApplyEveryPush(SyncPolicy):
    """Base of the policies without a global update step: each push is applied at once."""

    def on_push(self, worker: int, clock: int, grad: np.ndarray, now: float = 0.0,
                hint: dict | None = None) -> np.ndarray | None:
        self.clocks[worker] = max(clock, self.clocks.get(worker, -1))
        self.active.add(worker)  # a worker that left and came back is waited for again
        self.on_timed_push(worker, clock, now, hint)
        return grad

    def on_timed_push(self, worker: int, clock: int, now: float, hint: dict | None) -> None:
        """Hook for policies that watch the timing of pushes."""

    def lr_scale(self) -> float:
        return 1.0 / max(1, len(self.active))
