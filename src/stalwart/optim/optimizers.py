"""Server-side optimizers on a shard's flat float32 buffer, in place, without torch.

They follow ``torch.optim.SGD`` and ``torch.optim.Adam`` exactly (the tests compare them
on the same gradients). Every rule is elementwise, which is why a shard boundary may fall
inside a parameter tensor. ``state_dict`` exposes all state, so that checkpoints and
replicas carry the optimizer along with the weights.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np

from .vector import axpy


class ServerOptimizer(ABC):
    def __init__(self, size: int):
        self.size = size
        self.steps = 0
        self._scratch = np.empty(size, dtype=np.float32)

    @abstractmethod
    def step(self, params: np.ndarray, grad: np.ndarray, lr_scale: float = 1.0) -> None:
        """Apply one update to ``params`` in place; ``grad`` is not modified."""

    def state_dict(self) -> dict[str, np.ndarray | int]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])

    def _with_weight_decay(self, params: np.ndarray, grad: np.ndarray, weight_decay: float) -> np.ndarray:
        if not weight_decay:
            return grad
        np.multiply(params, np.float32(weight_decay), out=self._scratch)
        self._scratch += grad
        return self._scratch


class SGD(ServerOptimizer):
    def __init__(self, size: int, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, **_: object):
        super().__init__(size)
        if nesterov and momentum <= 0:
            raise ValueError("nesterov momentum requires momentum > 0")
        self.lr, self.momentum, self.nesterov, self.weight_decay = lr, momentum, nesterov, weight_decay
        self.buf = np.zeros(size, dtype=np.float32) if momentum else None

    def step(self, params: np.ndarray, grad: np.ndarray, lr_scale: float = 1.0) -> None:
        d_p = self._with_weight_decay(params, grad, self.weight_decay)
        if self.buf is not None:
            if self.steps == 0:
                np.copyto(self.buf, d_p)
            else:
                self.buf *= np.float32(self.momentum)
                self.buf += d_p
            if self.nesterov:
                if d_p is not self._scratch:
                    np.copyto(self._scratch, d_p)
                axpy(self.momentum, self.buf, self._scratch)
                d_p = self._scratch
            else:
                d_p = self.buf
        axpy(-self.lr * lr_scale, d_p, params)
        self.steps += 1

    def state_dict(self) -> dict:
        return {**super().state_dict(), **({"buf": self.buf} if self.buf is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.buf is not None:
            np.copyto(self.buf, state["buf"])


class Adam(ServerOptimizer):
    def __init__(self, size: int, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, **_: object):
        super().__init__(size)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.exp_avg = np.zeros(size, dtype=np.float32)
        self.exp_avg_sq = np.zeros(size, dtype=np.float32)
        self._denom = np.empty(size, dtype=np.float32)

    def step(self, params: np.ndarray, grad: np.ndarray, lr_scale: float = 1.0) -> None:
        beta1, beta2 = self.betas
        g = self._with_weight_decay(params, grad, self.weight_decay)
        self.steps += 1
        self.exp_avg *= np.float32(beta1)
        self.exp_avg += np.float32(1 - beta1) * g
        self.exp_avg_sq *= np.float32(beta2)
        np.multiply(g, g, out=self._denom)
        self.exp_avg_sq += np.float32(1 - beta2) * self._denom
        bias1 = 1 - beta1 ** self.steps
        bias2_sqrt = math.sqrt(1 - beta2 ** self.steps)
        np.sqrt(self.exp_avg_sq, out=self._denom)
        self._denom /= np.float32(bias2_sqrt)
        self._denom += np.float32(self.eps)
        step_size = self.lr * lr_scale / bias1
        np.divide(self.exp_avg, self._denom, out=self._denom)
        self._denom *= np.float32(step_size)
        params -= self._denom

    def state_dict(self) -> dict:
        return {**super().state_dict(), "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        np.copyto(self.exp_avg, state["exp_avg"])
        np.copyto(self.exp_avg_sq, state["exp_avg_sq"])


OPTIMIZERS: dict[str, type[ServerOptimizer]] = {"sgd": SGD, "adam": Adam}


def optimizer_from_config(config, size: int) -> ServerOptimizer:
    """The job's optimizer (an ``OptimizerConfig``) on ``size`` values: what a server
    runs on its shard, and what a stateless worker runs alone on its copy."""
    c = config
    return build_optimizer(c.name, size, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                           weight_decay=c.weight_decay, betas=c.betas, eps=c.eps)


def build_optimizer(name: str, size: int, **hyper: object) -> ServerOptimizer:
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}") from None
    return cls(size, **hyper)
