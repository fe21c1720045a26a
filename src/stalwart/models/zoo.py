"""The built-in networks and the loader of user factories."""

from __future__ import annotations

import importlib
from math import prod
from typing import Callable

import torch
from torch import nn

from .builtin import BUILTIN


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 256) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(prod(input_shape), hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class CNN1D(nn.Module):
    """A small 1-D CNN for MNIST-1D: three strided convolutions and a linear head."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: int = 32):
        super().__init__()
        c_in, length = input_shape
        self.features = nn.Sequential(
            nn.Conv1d(c_in, channels, 5, padding=2), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, c_in, length)).numel()
        self.head = nn.Linear(flat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class PaperCNN(nn.Module):
    """The seed paper's CNN: conv16-pool-conv32-pool-fc512-dropout-fc10 (28x28 inputs)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        c_in, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c_in, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, c_in, h, w)).numel()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, 512), nn.ReLU(), nn.Dropout(0.5),
                                  nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": lambda shape, classes, hidden=256: mlp(shape, classes, hidden),
    "cnn1d": lambda shape, classes, hidden=256: CNN1D(shape, classes),
    "papercnn": lambda shape, classes, hidden=256: PaperCNN(shape, classes),
}


assert set(MODELS) == set(BUILTIN)


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, *, seed: int,
                hidden: int = 256) -> nn.Module:
    """The same seed gives the same initial weights in every process."""
    torch.manual_seed(seed)
    if name in MODELS:
        if name == "cnn1d" and len(input_shape) != 2:
            raise ValueError(f"cnn1d expects (channels, length) inputs, got {input_shape}")
        if name == "papercnn" and len(input_shape) != 3:
            raise ValueError(f"papercnn expects (channels, height, width) inputs, got {input_shape}")
        return MODELS[name](tuple(input_shape), num_classes, hidden)
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load model factory {name!r}: {exc}") from None
    model = factory(tuple(input_shape), num_classes)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
