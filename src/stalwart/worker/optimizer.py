"""A drop-in optimizer that trains a ``torch.nn.Module`` through stalwart's servers.

Usage, inside any training loop you already have, in a script run by ``stalwart run``::

    opt = stalwart.ParameterServerOptimizer(model)   # finds its job in the environment
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()            # push the gradient, pull fresh parameters
    opt.close()               # leave the job: no barrier waits for this worker any more

(or, outside ``stalwart run``, ``ParameterServerOptimizer(model, coordinator=ADDRESS,
token=TOKEN, worker=0)`` joins the job at that address as worker 0).

How it works, and why:

* **Flat buffers, no gather.** The model's parameters and their ``.grad`` are re-homed
  into two contiguous float32 vectors (:class:`~stalwart.worker.flat.FlatModel`). After
  ``backward()`` the gradient already lies in one buffer, which goes out as one frame per
  shard; a pull writes parameters straight back into the tensors the model computes with.
  A model on a GPU, or in another floating dtype, keeps its parameters where they are and
  moves them through float32 host vectors (pinned for a GPU), one copy each way; the
  servers always hold a float32 master copy. Parameters that do not require gradients
  are left alone.
* **Pushing during backward.** With ``overlap`` (the job's ``train.overlap``) the
  gradient is cut into buckets along shard boundaries, and each goes out from
  autograd's hook as soon as it is finished, so that communication can proceed where a
  core or a device is idle during backward
  (:class:`~stalwart.worker.overlap.OverlappedPush`); ``step()`` sends the rest and
  pulls. Off by default: on a machine whose cores all compute it measured no faster. The servers still see one push per worker per clock, the same bytes. It stays
  off (``overlap_off`` says why) for a staged model, over LTP, and under an injected
  straggler; a loop that calls ``backward()`` twice per step must turn it off.
* **Buffers.** Floating buffers (BatchNorm's running mean and variance) are no gradient's
  business: with ``buffers="average"`` (the job's ``train.buffers``) every
  ``buffer_every`` steps this worker offers them to shard 0's server and takes back the
  mean over the workers' latest offers (its own fresh, the others' from their own last
  averaging, at most an interval older), so every worker normalizes with statistics
  of all the data;
  ``"local"`` keeps each worker's own. Integer buffers (BatchNorm's batch counter) stay
  local.
* **The layout.** The servers learn the length of the parameter vector from the first
  worker that joins (for a script; a built-in model's is fixed beforehand); a worker
  whose model has another parameter count is refused with both counts named, one with
  the same count under other names or shapes by a digest of them.
* **The update rule lives on the servers.** Learning rate, momentum and Adam's moments
  are server state (they must survive a worker and be shared by all workers), so this
  object has no ``param_groups`` to tune: configure the job's optimizer instead.
* **Synchronization is the servers' business.** ``step()`` pushes clock ``c`` and pulls
  at the servers' gate for ``c``: under BSP it returns once every worker has pushed ``c``
  and the mean update is applied; under ASP it returns at once with the latest weights.
  The same loop runs under every policy.
* **One starting point.** The first ``step()`` offers this worker's initial weights to
  every shard and then pulls; a shard keeps the first offer it receives, so all workers
  start from identical weights even if their seeds differ. A worker that comes into a
  job under way (the servers give it a clock past 0: it joined, or came back) does not
  push the gradient it computed on its own initial weights: that first step only pulls.
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
  :class:`~stalwart.worker.client.JobStopping`, a ``SystemExit`` of status 0: a script
  that does not catch it ends quietly. ``close()`` (or the end of the process) tells the
  servers this worker left, so a barrier does not wait for it.
* **The job's bracket.** Made from the environment (or by a built-in worker), the
  optimizer has a :class:`~stalwart.worker.session.WorkerSession`, which it calls around
  every push+pull: that is where computation and communication are timed, where an
  injected straggler sleeps, and how heartbeats know the worker's clock.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..control import CoordinatorClient
from ..layout import ParameterLayout
from .client import ParameterClient
from .flat import FlatModel
from .overlap import DEFAULT_BUCKET_MB, OverlappedPush
from .session import WorkerSession


class ParameterServerOptimizer:
    def __init__(self, model: torch.nn.Module, *, client: ParameterClient | None = None,
                 coordinator: str | None = None, token: bytes | str | None = None, worker: int = 0,
                 transport: str = "tcp", timeout_s: float = 60.0, train_through=None,
                 session: WorkerSession | None = None, buffers: str | None = None, buffer_every: int | None = None,
                 staged: bool = False, overlap: bool | None = None, bucket_mb: float | None = None):
        self.flat = FlatModel(model, staged=staged)
        if client is None and coordinator is None and token is None:
            session = session or WorkerSession.from_env()
        if session is not None:
            train = session.job.train
            buffers, buffer_every = buffers or train.buffers, buffer_every or train.buffer_every
            overlap = train.overlap if overlap is None else overlap
            bucket_mb = bucket_mb or train.bucket_mb
            if client is None:
                client, train_through = session.connect(model, self._averaged_size(buffers))
        if buffers not in (None, "average", "local"):
            raise ValueError(f"buffers must be 'average' or 'local', got {buffers!r}")
        self.buffers, self.buffer_every = buffers or "local", buffer_every or 20
        if client is None:
            if coordinator is None or token is None:
                raise ValueError("give a coordinator address and the job token (or run under `stalwart run`)")
            token = bytes.fromhex(token) if isinstance(token, str) else token
            control = CoordinatorClient(coordinator, token, "client", worker)
            try:
                layout = ParameterLayout.from_module(model)
                bounds = control.layout(layout.total, timeout_s, digest=layout.digest())
                shards = control.shard_map(timeout_s)
            finally:
                control.close()
            client = ParameterClient(shards, bounds, token, worker=worker, transport=transport,
                                     buffer_size=self._averaged_size(self.buffers))
        if client.bounds[-1] != self.flat.params.numel():
            raise ValueError(f"the servers hold {client.bounds[-1]} parameters, the model has "
                             f"{self.flat.params.numel()}")
        self.client, self.session = client, session
        self.train_through = train_through
        self.clock = 0
        self.version = 0
        self._started = False
        self.overlap_off = self._why_no_overlap(bool(overlap))
        self.overlap = None if self.overlap_off else OverlappedPush(self.flat, client,
                                                                    bucket_mb or DEFAULT_BUCKET_MB)

    def _why_no_overlap(self, wanted: bool) -> str | None:
        """Why this worker pushes after backward rather than during it (None: it overlaps)."""
        if not wanted:
            return "turned off"
        if self.flat.staged:
            return "the gradient is staged through host memory (a device or non-float32 model)"
        if self.client.transport == "ltp":
            return "LTP sends a push as one loss-tolerant message"
        if self.session is not None and self.session.straggler.rules:
            return "an injected straggler delays its push as a whole"
        return None

    def _averaged_size(self, buffers: str | None) -> int:
        return self.flat.buffer_size if buffers == "average" else 0

    def _pull(self) -> list[int]:
        versions = self.client.pull(self.flat.params_np, wait=False)
        self.flat.scatter()
        return versions

    def _start(self) -> bool:
        """Offer the initial weights and pull; True if this worker comes into a job under
        way (the servers give it a clock past 0: it joined, or came back)."""
        self.clock = self.client.init(self.flat.params_np)
        self.version = min(self._pull())
        self._started = True
        return self.clock > 0

    def zero_grad(self, set_to_none: bool = False) -> None:
        self.flat.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._started and self._start():
            # The gradient was computed on this worker's initial weights, and the servers
            # have trained since (a worker that joins, or restarts): it is stale, so this
            # step only brought the current parameters.
            self._arm()
            return loss
        if self.session is not None:
            self.session.before_sync(self.clock)
        pushed, broke = self.overlap.finish() if self.overlap is not None else (frozenset(), frozenset())
        grads = self.flat.gathered_grads()
        versions = self.client.push_pull(grads, self.flat.params_np, self.clock, pushed=pushed, broke=broke)
        if self.train_through is not None:
            back = self.train_through.step(grads, self.flat.params_np, self.clock)
            if back:
                # Continue where the rebuilt servers are, from their merged parameters.
                self.clock = max([self.clock] + [r.resume_clock - 1 for r in back])
                versions = self.client.pull(self.flat.params_np, wait=False)
        self.flat.scatter()
        self.version = min(versions)
        self.clock += 1
        if self.buffers == "average" and self.flat.buffers and self.clock % self.buffer_every == 0 \
                and not self.client.detached:
            self.average_buffers()
        if self.session is not None:
            self.session.after_sync(self.clock)
        self._arm()
        return loss

    def _arm(self) -> None:
        if self.overlap is not None:
            self.overlap.arm(self.clock)

    def average_buffers(self) -> None:
        """Replace this worker's floating buffers by the mean over the workers' latest."""
        self.flat.set_buffers(torch.from_numpy(self.client.average_buffers(self.flat.buffer_vector().numpy())))

    def sync(self) -> None:
        """Pull the latest parameters without pushing (e.g. before evaluating)."""
        if self.overlap is not None and self.overlap.started:
            raise RuntimeError("sync() between backward() and step(): part of this step's push is already out; "
                               "call step() first")
        if not self._started:
            self._start()
            self._arm()
        else:
            self.version = min(self._pull())

    def close(self) -> None:
        """Leave the job: the servers stop waiting for this worker."""
        if self.overlap is not None:
            self.overlap.close()
        if self.session is not None:
            self.session.close(iterations=self.clock)
        elif self.client.conns:
            self.client.goodbye()
