"""Asynchronous parallel: every push is applied the moment it arrives; nobody waits."""

from __future__ import annotations

import numpy as np

from .base import SyncPolicy


class ASP(SyncPolicy):
    name = "asp"

    def on_push(self, worker: int, clock: int, grad: np.ndarray) -> np.ndarray:
        self.clocks[worker] = clock
        return grad

    def may_proceed(self, worker: int, clock: int) -> bool:
        return True
