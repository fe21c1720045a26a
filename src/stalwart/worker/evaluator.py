"""Test accuracy: of the model the servers hold (:class:`Evaluator`, an observer
client that pulls it), or of a model at hand (:func:`score`: a stateless worker's own
copy while its server is down)."""

from __future__ import annotations

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


class Evaluator:
    def __init__(self, model: torch.nn.Module, x_test: np.ndarray, y_test: np.ndarray,
                 client: ParameterClient, batch: int = 2048):
        self.model, self.client, self.batch = model, client, batch
        self.flat = FlatModel(model)
        self.x = torch.from_numpy(x_test)
        self.y = torch.from_numpy(y_test)

    def evaluate(self) -> dict:
        versions = self.client.pull(self.flat.params_np, wait=False)
        self.flat.scatter()
        return {"version": min(versions), **score(self.model, self.x, self.y, self.batch)}
