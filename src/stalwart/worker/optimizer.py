"""A drop-in optimizer that trains a ``torch.nn.Module`` through stalwart's servers.

Usage, inside any training loop you already have::

    opt = ParameterServerOptimizer(model, coordinator="127.0.0.1:7000", token=token, worker=0)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()            # push the gradient, pull fresh parameters
    opt.close()               # leave the job: no barrier waits for this worker any more

How it works, and why:

* **Flat buffers, no gather.** The model's parameters and their ``.grad`` are re-homed
  into two contiguous float32 vectors (:class:`~stalwart.worker.flat.FlatModel`). After
  ``backward()`` the gradient already lies in one buffer, which goes out as one frame per
  shard; a pull writes parameters straight back into the tensors the model computes with.
* **The update rule lives on the servers.** Learning rate, momentum and Adam's moments
  are server state (they must survive a worker and be shared by all workers), so this
  object has no ``param_groups`` to tune: configure the job's optimizer instead.
* **Synchronization is the servers' business.** ``step()`` pushes clock ``c`` and pulls
  at the servers' gate for ``c``: under BSP it returns once every worker has pushed ``c``
  and the mean update is applied; under ASP it returns at once with the latest weights.
  The same loop runs under every policy.
* **One starting point.** The first ``step()`` offers this worker's initial weights to
  every shard and then pulls; a shard keeps the first offer it receives, so all workers
  start from identical weights even if their seeds differ.
* **Surviving servers and restarts.** With a recovery strategy, a shard whose server
  died is found again through the coordinator and redialled with backoff inside
  ``step()`` (see :class:`~stalwart.worker.client.ParameterClient`); a worker process
  that was itself restarted learns from the servers, on its first ``step()``, the clock
  to continue from, so it rejoins the barrier being collected instead of clock 0.
* **Training through a dead server.** With stateless recovery (``train_through``, a
  :class:`~stalwart.worker.trainthrough.TrainThrough`), a shard whose server died is
  trained locally inside ``step()`` while it is down, and merged back when a server is
  there again; the loop above does not notice, except that it never stops.
* **Clean endings.** When the job stops, ``step()`` raises
  :class:`~stalwart.worker.client.JobStopping`; ``close()`` tells the servers this worker
  left, so a barrier does not wait for it.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..control import CoordinatorClient
from ..layout import ParameterLayout
from ..transport import ProtocolError
from .client import ParameterClient, ServerError
from .flat import FlatModel


class ParameterServerOptimizer:
    def __init__(self, model: torch.nn.Module, *, client: ParameterClient | None = None,
                 coordinator: str | None = None, token: bytes | str | None = None, worker: int = 0,
                 transport: str = "tcp", timeout_s: float = 60.0, train_through=None):
        self.flat = FlatModel(model)
        if client is None:
            if coordinator is None or token is None:
                raise ValueError("give either a ParameterClient or a coordinator address and the job token")
            token = bytes.fromhex(token) if isinstance(token, str) else token
            control = CoordinatorClient(coordinator, token, "client", worker)
            try:
                shards = control.shard_map(timeout_s)
            finally:
                control.close()
            bounds = ParameterLayout.from_module(model).shard_bounds(len(shards))
            client = ParameterClient(shards, bounds, token, worker=worker, transport=transport)
        if client.bounds[-1] != self.flat.params.numel():
            raise ValueError(f"the servers hold {client.bounds[-1]} parameters, the model has "
                             f"{self.flat.params.numel()}")
        self.client = client
        self.train_through = train_through
        self.clock = 0
        self.version = 0
        self._started = False

    def _start(self) -> None:
        self.clock = self.client.init(self.flat.params_np)
        self.version = min(self.client.pull(self.flat.params_np, wait=False))
        self._started = True

    def zero_grad(self, set_to_none: bool = False) -> None:
        self.flat.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._started:
            # The gradient was computed on local initial weights; so were everyone's.
            self._start()
        grads = self.flat.gathered_grads()
        versions = self.client.push_pull(grads, self.flat.params_np, self.clock)
        if self.train_through is not None:
            back = self.train_through.step(grads, self.flat.params_np, self.clock)
            if back:
                # Continue where the rebuilt servers are, from their merged parameters.
                self.clock = max([self.clock] + [r.resume_clock - 1 for r in back])
                versions = self.client.pull(self.flat.params_np, wait=False)
        self.version = min(versions)
        self.clock += 1
        return loss

    def sync(self) -> None:
        """Pull the latest parameters without pushing (e.g. before evaluating)."""
        if not self._started:
            self._start()
        else:
            self.version = min(self.client.pull(self.flat.params_np, wait=False))

    def close(self) -> None:
        if self.client.conns:
            try:
                self.client.leave()
            except (ConnectionError, OSError, ProtocolError, ServerError):
                pass  # the servers are already gone; there is no barrier left to release
            finally:
                self.client.close()
