"""Test accuracy: of the model the servers hold (:class:`Evaluator`, an observer
client that pulls it), or of a model at hand (:func:`score`: a stateless worker's own
copy while its server is down).

The evaluator shares the machine with the job it watches: on two cores a full test pass
every second takes CPU from the workers. So it runs on one thread, its periodic passes
may use a fixed, seeded subset of the test set (``train.eval_subset``; the final pass
always uses all of it), and it counts the CPU seconds it spent (``cpu_s`` on each
``eval`` event), which the summary reports as its share of the job's CPU.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .client import ParameterClient
from .flat import FlatModel


@torch.no_grad()
def score(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2048) -> dict:
    """Accuracy and mean cross-entropy of ``model`` on ``(x, y)``, in eval mode (its
    mode is restored after)."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch):
        out = model(x[i:i + batch])
        loss += torch.nn.functional.cross_entropy(out, y[i:i + batch], reduction="sum").item()
        correct += (out.argmax(1) == y[i:i + batch]).sum().item()
    model.train(was_training)
    return {"accuracy": correct / len(y), "loss": loss / len(y)}


def subset_indices(n: int, subset: int | None, seed: int = 0) -> np.ndarray:
    """The test examples a periodic pass scores: a fixed seeded draw of ``subset`` of
    ``n`` (all of them for None, or a subset no smaller than the set), in order."""
    if subset is None or subset >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, subset, replace=False))


class Evaluator:
    """Scores the servers' model. ``subset`` (examples, None for all) is what periodic
    passes score: the same seeded draw every time, so successive points compare."""

    def __init__(self, model: torch.nn.Module, x_test: np.ndarray, y_test: np.ndarray,
                 client: ParameterClient, batch: int = 2048, subset: int | None = None, seed: int = 0):
        # One thread: the driver's process is not a role, but its cores are the workers'.
        torch.set_num_threads(1)
        self.model, self.client, self.batch = model, client, batch
        self.flat = FlatModel(model)
        self.x = torch.from_numpy(x_test)
        self.y = torch.from_numpy(y_test)
        pick = subset_indices(len(y_test), subset, seed)
        self.x_part, self.y_part = self.x[pick], self.y[pick]

    def evaluate(self, full: bool = True) -> dict:
        """Pull the servers' model and score it on the whole test set, or (``full``
        False) on the subset; ``cpu_s`` is this thread's CPU time for the pass."""
        start = time.thread_time()
        versions = self.client.pull(self.flat.params_np, wait=False)
        self.flat.scatter()
        x, y = (self.x, self.y) if full else (self.x_part, self.y_part)
        result = score(self.model, x, y, self.batch)
        return {"version": min(versions), **result, "examples": len(y), "cpu_s": time.thread_time() - start}
