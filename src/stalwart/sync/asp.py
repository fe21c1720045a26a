"""Asynchronous parallel: every push is applied the moment it arrives; nobody waits.

Each push is one worker's gradient, applied with the learning rate scaled by 1/N (N
workers in the job), so that N pushes move the model as far as one BSP update of the
mean of N gradients.

Joining and leaving: N is the number of workers active now, so a worker that joins a
running job (or leaves it) changes the scale from the next push on; nobody waits for
anybody, so a newcomer starts at once, from the slowest worker's clock.
"""

from __future__ import annotations

from .base import ApplyEveryPush


class ASP(ApplyEveryPush):
    name = "asp"

    def may_proceed(self, worker: int, clock: int) -> bool:
        return True
