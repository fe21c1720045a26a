"""Asynchronous parallel: every push is applied the moment it arrives; nobody waits.

Each push is one worker's gradient, applied with the learning rate scaled by 1/N (N
workers in the job), so that N pushes move the model as far as one BSP update of the
mean of N gradients.
"""

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

    def lr_scale(self) -> float:
        return 1.0 / max(1, len(self.active))
