"""Bulk synchronous parallel: one barrier per clock.

The server sums the gradients of clock ``c`` from every active worker, applies their
mean as one update, and only then lets any worker pull for clock ``c + 1``. A worker
that leaves (finished, or lost) stops being waited for; if its absence completes the
barrier, the mean of those who did push is applied.

A server that restarts (after a crash) knows no clock. Until its first barrier
completes it follows the workers: a push for a later clock than the one collected
proves that the earlier barrier completed before the crash, so the collection moves
forward to it (the partial sum, part of the lost state, is dropped); a push for an
earlier clock is such a completed barrier's late resend, counted as done. The same
holds once every worker has left: the clock is whatever the returning workers bring.

A worker that (re)joins a running job may find the shards one barrier apart: another
worker's push for clock ``c`` reached one shard and not yet the other. It continues
from the lowest clock any shard collects, so no shard is asked for a barrier it has not
reached; where that barrier already completed without it, its push is late and dropped
(it counts nowhere), until it catches up with the barrier being collected.

Joining and leaving: a newcomer is admitted into the barrier being collected (its
``join`` returns that clock), so the workers already waiting there wait for its first
push, a step of computation and no more (the drop-in optimizer pulls the current
parameters before a joiner's first push, and does not push a gradient it computed on
stale weights). A worker that leaves stops being waited for at once.
"""

from __future__ import annotations

import numpy as np

from .base import SyncError, SyncPolicy


class BSP(SyncPolicy):
    name = "bsp"

    def __init__(self, workers: int, shard_size: int, leader: bool = True):
        super().__init__(workers, shard_size, leader)
        self.clock = 0              # the clock whose barrier is being collected
        self.done_clock = -1        # the last clock whose barrier completed
        self.pushed: set[int] = set()
        self._sum = np.zeros(shard_size, dtype=np.float32)
        self.synced = False  # becomes True with the first completed barrier
        self.rejoining: set[int] = set()  # joined, and not yet at the barrier being collected

    def on_push(self, worker: int, clock: int, grad: np.ndarray, now: float = 0.0,
                hint: dict | None = None) -> np.ndarray | None:
        if not self.synced and clock > self.clock:
            self.clock, self.done_clock, self.pushed = clock, clock - 1, set()
        elif clock < self.clock and (not self.synced or worker in self.rejoining):
            return None  # a completed barrier's late push (see the module docstring)
        self.rejoining.discard(worker)
        if clock != self.clock:
            raise SyncError(f"worker {worker} pushed clock {clock} while the barrier "
                            f"collects clock {self.clock}")
        if worker in self.pushed:
            return None  # a resend of a push already counted
        if not self.pushed:
            np.copyto(self._sum, grad)
        else:
            self._sum += grad
        self.pushed.add(worker)
        self.clocks[worker] = clock
        self.active.add(worker)
        return self._complete_if_ready()

    def _complete_if_ready(self) -> np.ndarray | None:
        if not self.pushed or not self.active <= self.pushed:
            return None
        self._sum *= np.float32(1.0 / len(self.pushed))
        self.synced = True
        self.done_clock = self.clock
        self.clock += 1
        self.pushed = set()
        return self._sum

    def join(self, worker: int) -> int:
        self.active.add(worker)
        self.rejoining.add(worker)
        return self.clock  # the barrier being collected now waits for it too

    def may_proceed(self, worker: int, clock: int) -> bool:
        return self.done_clock >= clock

    def leave(self, worker: int, now: float = 0.0) -> np.ndarray | None:
        super().leave(worker, now)
        # A gradient it already pushed for this clock still counts in the mean.
        update = self._complete_if_ready()
        if not self.active:
            # Nobody is left to hold a barrier with (e.g. every worker went local through
            # a stateless outage): those who come back bring the clock, as after a restart.
            self.synced = False
        return update

    def state_dict(self) -> dict:
        return {**super().state_dict(), "clock": self.clock, "done_clock": self.done_clock,
                "pushed": sorted(self.pushed), "sum": self._sum, "synced": self.synced,
                "rejoining": sorted(self.rejoining)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.clock, self.done_clock = int(state["clock"]), int(state["done_clock"])
        self.pushed, self.rejoining = set(state["pushed"]), set(state["rejoining"])
        np.copyto(self._sum, state["sum"])
        self.synced = bool(state["synced"])
