"""The worker's side of stateless recovery: train through a dead server, owe it backlogs.

See :mod:`stalwart.recovery.stateless` for the whole mechanism (detach, rebuild,
flush) and the server's side of it. Here: :class:`TrainThrough`, which the drop-in
optimizer calls after every step, and :class:`Backlog`, what a worker owes one shard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .failover import ServerUnavailable

FULL_POLICIES = ("wait", "drop")


@dataclass
class Backlog:
    """What a worker owes one shard while its server is down: sum and count, bounded."""
    base: np.ndarray            # the shard as last pulled (what the worker offers for a rebuild)
    base_version: int
    bound: int                  # at most this many local steps owed
    delta: np.ndarray = field(init=False)
    count: int = 0              # local steps in ``delta``
    steps: int = 0              # local steps taken, owed or not
    compute_s: float = 0.0      # seconds of computation while detached
    opened: float = field(default_factory=time.monotonic)
    announced_full: bool = False

    def __post_init__(self) -> None:
        self.base = self.base.copy()
        self.delta = np.zeros_like(self.base)

    @property
    def full(self) -> bool:
        return self.count >= self.bound

    def add(self, change: np.ndarray) -> bool:
        """Owe one more local step's change; False (and nothing added) when full."""
        if self.full:
            return False
        self.delta += change
        self.count += 1
        return True


@dataclass
class Reattached:
    """What :meth:`TrainThrough.step` reports about a shard that came back."""
    shard: int
    version: int
    resume_clock: int


class TrainThrough:
    """The worker's side: local steps while detached, the backlogs, reattaching.

    ``client`` is a :class:`~stalwart.worker.client.ParameterClient` made with
    a :class:`~stalwart.worker.failover.Detach` failover: when a shard's connection breaks, *every* shard lands in
    ``client.detached`` instead of an exception. The worker goes local as a whole
    because a partial detachment poisons the live shards: they would go on taking
    gradients computed against N different local copies of the dead shard, and the
    merged model would pair layers that never trained together. Detached as a whole,
    each worker trains one consistent model; the merge is then an average of such
    models (local SGD), which is known to work from a common starting point.

    Reattaching is all or nothing, the shards whose server died first (the others
    answer at once): a worker never pushes to some shards while training others alone.
    Called after every push/pull with the step's gradient and the model's flat
    parameters.
    """

    def __init__(self, client, make_optimizer, *, bound: int, when_full: str, retry_s: float = 0.25,
                 reconnect_s: float = 60.0, on_event=None):
        if when_full not in FULL_POLICIES:
            raise ValueError(f"unknown backlog policy {when_full!r}; choose one of {list(FULL_POLICIES)}")
        self.client, self.make_optimizer = client, make_optimizer
        self.bound, self.when_full = bound, when_full
        self.retry_s, self.reconnect_s = retry_s, reconnect_s
        self.on_event = on_event or (lambda *a, **k: None)
        self.backlogs: dict[int, Backlog] = {}
        self._optimizers: dict[int, object] = {}
        self._scratch: dict[int, np.ndarray] = {}
        self._next_try = 0.0
        self.compute_while_down_s = 0.0  # worker-seconds of training while detached
        self._last_call = time.monotonic()

    def step(self, grad: np.ndarray, params: np.ndarray, clock: int) -> list[Reattached]:
        """Train the detached shards locally on ``grad``; reattach when every one is back."""
        # The time since the last step ended: this step's computation (not waiting).
        busy_s, self._last_call = time.monotonic() - self._last_call, time.monotonic()
        if not self.client.detached:
            return []
        self.compute_while_down_s += busy_s
        back = []
        shards = sorted(self.client.detached)
        for s in shards:
            if s not in self.backlogs:
                self._open(s, params[self.client.bounds[s]:self.client.bounds[s + 1]])
            self.backlogs[s].compute_s += busy_s
        full = [s for s in shards if self.backlogs[s].full]
        for s in full:
            if not self.backlogs[s].announced_full:
                self.backlogs[s].announced_full = True
                self.on_event("backlog_full", shard=s, count=self.backlogs[s].count, policy=self.when_full)
        if full and self.when_full == "wait":
            back = self._wait_for(clock)
        else:
            for s in shards:
                lo, hi = self.client.bounds[s], self.client.bounds[s + 1]
                self._local_step(s, self.backlogs[s], params[lo:hi], grad[lo:hi])
            if time.monotonic() >= self._next_try:
                back = self._try_reattach(clock)
        self._last_call = time.monotonic()
        return back

    def not_training(self, seconds: float) -> None:
        """``seconds`` since the last step went to something else (evaluating the local
        copy): not counted as computing through the outage."""
        self._last_call += seconds

    def _open(self, s: int, shard_params: np.ndarray) -> Backlog:
        version = self.client.versions[s]
        backlog = self.backlogs[s] = Backlog(shard_params, version, self.bound)
        self._optimizers[s] = self.make_optimizer(shard_params.size)
        self._scratch[s] = np.empty_like(shard_params)
        self._next_try = time.monotonic() + self.retry_s
        self.on_event("detached", shard=s, base_version=version, bound=self.bound,
                      lost_server=s in self.client.broken)
        return backlog

    def _local_step(self, s: int, backlog: Backlog, shard_params: np.ndarray, shard_grad: np.ndarray) -> None:
        change = self._scratch[s]
        np.copyto(change, shard_params)
        self._optimizers[s].step(shard_params, shard_grad)
        np.subtract(shard_params, change, out=change)
        backlog.steps += 1
        backlog.add(change)  # refused when full: under "drop" the step stays local

    def _wait_for(self, clock: int) -> list[Reattached]:
        """A backlog is full and the policy is to wait: retry until the shards are back."""
        deadline = min(b.opened for b in self.backlogs.values()) + self.reconnect_s
        while True:
            back = self._try_reattach(clock)
            if back:
                return back
            if time.monotonic() >= deadline:
                raise ServerUnavailable(f"shards {sorted(self.client.detached)} did not come back within "
                                        f"{self.reconnect_s:g}s and the backlog is full ({self.bound} steps)")
            time.sleep(min(self.retry_s, max(0.0, deadline - time.monotonic())))  # backoff, not sync

    def _try_reattach(self, clock: int) -> list[Reattached]:
        self._next_try = time.monotonic() + self.retry_s
        # The shards that lost their server first: while one is still down, the others
        # (whose servers never died) are not even dialled.
        order = sorted(self.client.detached, key=lambda s: (s not in self.client.broken, s))
        rebuilt = {}
        try:
            for s in order:
                b = self.backlogs[s]
                rebuilt[s] = self.client.reattach(s, b.base, b.base_version, clock)
            flushed = {s: self.client.flush(s, self.backlogs[s].delta, self.backlogs[s].count,
                                            self.backlogs[s].base_version) for s in order}
        except (ConnectionError, OSError):
            for s in order:
                if s in self.client.detached:
                    self.client.detach(s)
            return []
        back = []
        for s in order:
            b, (version, resume), answer = self.backlogs.pop(s), rebuilt[s], flushed[s]
            del self._optimizers[s], self._scratch[s]
            self.on_event("flushed", shard=s, base_version=b.base_version, rebuilt_version=version,
                          version=answer["version"], count=b.count, local_steps=b.steps,
                          compute_s=round(b.compute_s, 4), down_s=round(time.monotonic() - b.opened, 4),
                          staleness=answer["staleness"], scale=answer["scale"],
                          delta_norm=round(float(np.linalg.norm(b.delta)), 6))
            back.append(Reattached(s, answer["version"], resume))
        return back
