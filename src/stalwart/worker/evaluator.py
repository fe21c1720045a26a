"""Test accuracy of the model the servers hold, measured by an observer client."""

from __future__ import annotations

import numpy as np
import torch

from .client import ParameterClient
from .flat import FlatModel


class Evaluator:
    def __init__(self, model: torch.nn.Module, x_test: np.ndarray, y_test: np.ndarray,
                 client: ParameterClient, batch: int = 2048):
        self.model, self.client, self.batch = model, client, batch
        self.flat = FlatModel(model)
        self.x = torch.from_numpy(x_test)
        self.y = torch.from_numpy(y_test)

    @torch.no_grad()
    def evaluate(self) -> dict:
        versions = self.client.pull(self.flat.params_np, wait=False)
        self.model.eval()
        correct, loss = 0, 0.0
        for i in range(0, len(self.y), self.batch):
            out = self.model(self.x[i:i + self.batch])
            y = self.y[i:i + self.batch]
            loss += torch.nn.functional.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
        n = len(self.y)
        return {"version": min(versions), "accuracy": correct / n, "loss": loss / n}
