"""Stale synchronous parallel, ``ssp:S`` (Ho et al., 2013).

Pushes are applied as they arrive (learning rate scaled by 1/N, as under ASP), but no
worker may run more than ``S`` clocks ahead of the slowest: a worker that pushed clock
``c`` may begin ``c + 1`` only once every active worker has pushed ``c - S``. So the
parameters a worker reads at clock ``c`` hold every worker's updates up to ``c - S - 1``.
``ssp:0`` waits like BSP but applies gradients one by one; a large ``S`` tends to ASP.
The rule reads only clocks, so every shard gates identically.

Joining and leaving: a worker that joins (or comes back after a restart) starts from
the slowest active worker's clock, so the bound holds at once and nobody waits for it
to catch up; a worker that leaves is no longer the slowest, so whoever waited on it
goes on.
"""

from __future__ import annotations

from .base import ApplyEveryPush


class SSP(ApplyEveryPush):
    name = "ssp"

    def __init__(self, workers: int, shard_size: int, leader: bool = True, staleness: int = 3):
        super().__init__(workers, shard_size, leader)
        if staleness < 0:
            raise ValueError(f"ssp staleness must be >= 0, got {staleness}")
        self.staleness = staleness

    def bound(self, worker: int) -> int:
        return self.staleness

    def may_proceed(self, worker: int, clock: int) -> bool:
        return clock - self._slowest_clock() <= self.bound(worker)
