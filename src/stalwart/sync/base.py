"""The synchronization-policy interface, evaluated by every server on its own shard.

A policy answers two questions and nothing else:

* ``on_push``: a worker pushed its gradient for ``clock``; is there an update to apply
  now (and which), or is the gradient held until others arrive?
* ``may_proceed``: a worker that pushed ``clock`` asks for parameters to begin the
  next clock; may it have them now, or must it wait?

The server owns locking, the optimizer and the wire; a policy is plain, single-threaded
bookkeeping, which keeps each policy small and testable without processes. Policies are
deterministic functions of the pushes they see, so every server of a job, seeing the
same pushes, places the same barriers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class SyncError(ValueError):
    """A push that the policy cannot accept (e.g. a clock from the past under BSP)."""


class SyncPolicy(ABC):
    name: str = "?"

    def __init__(self, workers: int, shard_size: int):
        self.active: set[int] = set(range(workers))
        self.shard_size = shard_size
        self.clocks: dict[int, int] = {}  # last clock each worker pushed

    @abstractmethod
    def on_push(self, worker: int, clock: int, grad: np.ndarray) -> np.ndarray | None:
        """Account a push; return the gradient to apply now, or None to hold it."""

    @abstractmethod
    def may_proceed(self, worker: int, clock: int) -> bool:
        """May ``worker``, having pushed ``clock``, pull and begin ``clock + 1``?"""

    def lr_scale(self) -> float:
        """Scale of the learning rate for the update just returned by ``on_push``.

        One configured learning rate must mean the same thing under every policy: BSP
        applies the mean of N gradients per update, so a policy that applies single
        gradients scales its step by 1/N to move the model as far per N pushes.
        """
        return 1.0

    def leave(self, worker: int) -> np.ndarray | None:
        """``worker`` left the job; return an update that its absence completes, if any."""
        self.active.discard(worker)
        return None

    def describe(self) -> dict:
        return {"policy": self.name, "active": sorted(self.active)}
