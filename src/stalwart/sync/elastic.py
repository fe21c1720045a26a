"""ElasticBSP, ``elastic:R[:N]`` (Zhao et al., arXiv 2001.01347), with ZipLine.

Between two barriers every worker runs as fast as it can: its pushes are applied as
they arrive (learning rate scaled by 1/N, as under ASP) and its pulls never wait. The
leader (shard 0) chooses where the next barrier falls so that workers wait for each
other as little as possible:

1. **Monitor.** After a barrier is released, wait until every active worker has pushed
   at least twice since, so each has one interval measured with no barrier inside it.
2. **Predict.** Worker ``i`` last pushed clock ``c_i`` at ``t_i`` with interval ``d_i``;
   its pushes of clocks ``c_i + k`` are predicted at ``t_i + k * d_i`` for
   ``k = 2 .. R + 1``: an ``n x R`` matrix. (``k = 1`` is left out: that push is already
   being computed, and the worker could not learn of a barrier there before pulling.)
3. **Choose.** :func:`~stalwart.sync.zipline.zipline` picks one predicted push per
   worker with the smallest spread (ties to the earliest); worker ``i`` synchronizes
   after clock ``b_i``, its chosen one.
4. **Barrier.** The plan rides to each worker as a hint on the leader's push
   acknowledgements; the worker relays it to every shard on its push of clock ``b_i``
   (its arrival at the barrier) and on the pull that follows, and every shard holds
   such pulls until all active workers have arrived (or left). A shard releases a
   barrier pull only once every worker's push up to its ``b_i`` has been applied, so
   every worker leaves the barrier with the same parameters.

``d_i`` is the paper's rule by default (``N = 1``): the latest interval. With a span
``N > 1`` it is an exponentially weighted mean of the intervals measured so far
(weight ``2 / (N + 1)`` on the newest, as pandas' ``span``), carried across barriers: a
prediction that one noisy step cannot throw off, for machines whose scheduling noise is
of the order of a step, at the price of following a real change of speed more slowly.
Intervals that hold a barrier wait are never measured, under either rule.

Why the waits are longer than ZipLine predicts. ZipLine treats its predictions as
certain: it picks the barrier whose predicted arrivals lie closest, often within a few
milliseconds. But a worker's interval varies from one step to the next (on shared
cores by half a step or more), a prediction ``k`` steps ahead carries ``k`` such
errors, and the barrier opens at the *latest* arrival, the maximum of noisy times, which
lies later than the latest prediction on average. So beside the paper's prediction each
barrier also logs an *expected* wait: each arrival is taken to stray from its prediction
by a normal error, and the mean wait of each worker under that model is drawn from a
fixed-seed sample. The error's scale is learnt from the leader's own past forecasts:
after each barrier it measures every worker's arrival error relative to how far ahead
it predicted (``(actual - predicted) / horizon``), and keeps an exponentially weighted
mean square of it (over about the last ten barriers); the next plan's error for that
worker is its horizon times the root of that. Errors relative to the horizon, not
``sqrt(k)`` times one step's: on shared cores a slow phase lasts several steps, so one
step's errors do not cancel. Before a worker's first barrier the model falls back to
independent steps, ``k`` times its measured interval variance. The expected wait does not
change where the barrier falls (that is the paper's rule); it says what wait to expect.

Each barrier is logged with the predicted and the actual wait of every worker. A worker
that changes speed changes its intervals, so the next plans follow it.

Joining and leaving: a worker that leaves is taken out of the barrier being collected
and of the plans. Workers cannot join a running job, nor come back after a restart:
the plan in force names the barrier clock of each worker it timed, and a newcomer is in
none, so the coordinator refuses it (and the configuration a restart) with that reason.
"""

from __future__ import annotations

import time

import numpy as np

from .base import ApplyEveryPush, SyncError
from .zipline import zipline

NOISE_WEIGHT = 0.2  # of the newest interval (and barrier) in the noise estimates: about the last ten
NOISE_DRAWS = 256   # sampled arrival sets per expected wait


class ElasticBSP(ApplyEveryPush):
    name = "elastic"

    def __init__(self, workers: int, shard_size: int, leader: bool = True, lookahead: int = 15, span: int = 1):
        super().__init__(workers, shard_size, leader)
        if lookahead < 1:
            raise ValueError(f"elastic lookahead R must be >= 1, got {lookahead}")
        if span < 1:
            raise ValueError(f"elastic span N must be >= 1, got {span}")
        self.lookahead, self.span = lookahead, span
        self.weight = 2.0 / (span + 1)              # of the newest interval: 1.0 is the paper's rule
        self.released = -1                         # last barrier id opened on this shard
        self.arrivals: dict[int, dict[int, float]] = {}
        self.waiting: dict[int, int] = {}          # worker -> barrier id its current pull waits at
        self.barriers = 0
        # Leader only.
        self.recent: dict[int, list[tuple[int, float]]] = {}  # pushes since the last release
        self.interval: dict[int, float] = {}       # worker -> its predicted interval (see the docstring)
        self.noise: dict[int, tuple[float, float]] = {}  # worker -> EW mean and variance of its intervals
        self.error: dict[int, float] = {}          # worker -> EW mean square of its relative arrival error
        self.plan: dict | None = None

    # --- leader: monitor, predict, choose ---------------------------------------------
    def on_timed_push(self, worker: int, clock: int, now: float, hint: dict | None) -> None:
        barrier = self._barrier_of(worker, clock, hint)
        if barrier is not None:
            self.arrivals.setdefault(barrier, {})[worker] = now
            self._open_if_complete(now)
            return  # the interval up to the next push holds the barrier wait: not monitored
        if not self.leader:
            return
        pushes = self.recent.setdefault(worker, [])
        pushes.append((clock, now))
        del pushes[:-2]
        if len(pushes) == 2:
            latest = max(pushes[1][1] - pushes[0][1], 1e-6)
            known = self.interval.get(worker, latest)
            self.interval[worker] = self.weight * latest + (1 - self.weight) * known
            self._measure_noise(worker, latest)
        self._plan_if_monitored(now)

    def _measure_noise(self, worker: int, latest: float) -> None:
        """Exponentially weighted mean and variance of the worker's intervals (West's
        incremental form): how far one interval strays from the next."""
        mean, var = self.noise.get(worker, (latest, 0.0))
        dev = latest - mean
        self.noise[worker] = (mean + NOISE_WEIGHT * dev, (1 - NOISE_WEIGHT) * (var + NOISE_WEIGHT * dev * dev))

    def _expected_waits(self, workers: list[int], chosen: np.ndarray, steps: np.ndarray, horizon: np.ndarray,
                        barrier: int) -> np.ndarray:
        """Mean wait of each worker at the chosen barrier if every arrival strays from its
        prediction by a normal error: ``horizon`` times the worker's learnt relative error,
        or before its first barrier of variance ``steps`` times its interval variance."""
        sd = np.array([horizon[i] * np.sqrt(self.error[w]) if w in self.error
                       else np.sqrt(steps[i] * self.noise.get(w, (0.0, 0.0))[1]) for i, w in enumerate(workers)])
        rng = np.random.default_rng([barrier, 0xE1A5])
        arrivals = chosen[:, None] + sd[:, None] * rng.standard_normal((len(workers), NOISE_DRAWS))
        return (arrivals.max(axis=0)[None, :] - arrivals).mean(axis=1)

    def _plan_if_monitored(self, now: float) -> None:
        if self.plan is None and self.active and all(len(self.recent.get(w, ())) >= 2 for w in self.active):
            self._place_barrier(now)

    def _place_barrier(self, now: float) -> None:
        workers = sorted(self.active)
        steps = np.arange(2, self.lookahead + 2, dtype=np.float64)
        last_clock = np.array([self.recent[w][-1][0] for w in workers])
        last_time = np.array([self.recent[w][-1][1] for w in workers])
        interval = np.array([self.interval[w] for w in workers])
        predicted = last_time[:, None] + steps[None, :] * interval[:, None]
        t0 = time.perf_counter()
        columns, spread = zipline(predicted)
        search_s = time.perf_counter() - t0
        chosen = predicted[np.arange(len(workers)), columns]
        expected = self._expected_waits(workers, chosen, columns + 2.0, chosen - now, self.barriers)
        self.plan = {
            "barrier": self.barriers, "planned_at": now,
            "clocks": {w: int(last_clock[i] + 2 + columns[i]) for i, w in enumerate(workers)},
            "predicted": {w: float(chosen[i]) for i, w in enumerate(workers)},
            "interval": {w: float(interval[i]) for i, w in enumerate(workers)},
            "expected_wait": {w: float(expected[i]) for i, w in enumerate(workers)},
            "spread_s": spread, "search_s": search_s,
        }
        self.barriers += 1

    def hint_for(self, worker: int) -> dict | None:
        plan = self.plan
        if plan is None or worker not in plan["clocks"] or worker in self.arrivals.get(plan["barrier"], {}):
            return None
        return {"barrier": plan["barrier"], "clock": plan["clocks"][worker]}

    # --- every shard: the barrier itself ----------------------------------------------
    def _barrier_of(self, worker: int, clock: int, hint: dict | None) -> int | None:
        """The barrier this request of ``clock`` belongs to, if the relayed hint names one."""
        if not hint:
            return None
        barrier, at = hint.get("barrier"), hint.get("clock")
        if type(barrier) is not int or type(at) is not int or barrier < 0:
            raise SyncError(f"worker {worker} relayed a malformed barrier hint {hint!r}")
        if at != clock or barrier <= self.released:
            return None  # not this request's barrier, or one already opened
        if self.leader and (self.plan is None or barrier != self.plan["barrier"]):
            raise SyncError(f"worker {worker} relayed barrier {barrier}, which the leader never placed")
        return barrier

    def on_pull(self, worker: int, clock: int, hint: dict | None, now: float = 0.0) -> None:
        self.waiting.pop(worker, None)
        barrier = self._barrier_of(worker, clock, hint)
        if barrier is not None:
            self.waiting[worker] = barrier  # held until the barrier opens (pushes open it)

    def may_proceed(self, worker: int, clock: int) -> bool:
        barrier = self.waiting.get(worker)
        return barrier is None or barrier <= self.released

    def leave(self, worker: int, now: float = 0.0) -> np.ndarray | None:
        super().leave(worker, now)
        self.recent.pop(worker, None)
        self.interval.pop(worker, None)
        self.noise.pop(worker, None)
        self.error.pop(worker, None)
        self._open_if_complete(now)
        if self.leader:
            self._plan_if_monitored(now)
        return None

    def _open_if_complete(self, now: float) -> None:
        for barrier in sorted(self.arrivals):
            arrived = self.arrivals[barrier]
            if barrier <= self.released or not arrived or not self.active <= arrived.keys():
                continue
            self.released = barrier
            del self.arrivals[barrier]
            if self.leader:
                self._record(barrier, arrived, now)

    def _record(self, barrier: int, arrived: dict[int, float], now: float) -> None:
        plan = self.plan
        self.plan = None
        self.recent = {}
        if plan is None or plan["barrier"] != barrier:
            return
        predicted_open = max(plan["predicted"].values())
        t0 = plan["planned_at"]
        errors = {w: arrived[w] - t for w, t in plan["predicted"].items() if w in arrived}
        for w, err in errors.items():
            relative = (err / max(plan["predicted"][w] - t0, 1e-6)) ** 2
            known = self.error.get(w, relative)
            self.error[w] = NOISE_WEIGHT * relative + (1 - NOISE_WEIGHT) * known
        self._events.append(("barrier", {
            "barrier": barrier, "clocks": plan["clocks"], "interval_s": plan["interval"],
            "predicted_wait_s": {w: predicted_open - t for w, t in plan["predicted"].items()},
            "expected_wait_s": plan.get("expected_wait", {}),
            "arrival_error_s": errors,
            "actual_wait_s": {w: now - t for w, t in arrived.items()},
            "predicted_open_s": predicted_open - t0, "actual_open_s": now - t0,
            "predicted_spread_s": plan["spread_s"],
            "actual_spread_s": max(arrived.values()) - min(arrived.values()),
            "zipline_s": plan["search_s"],
        }))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "released": self.released, "arrivals": self.arrivals,
                "waiting": dict(self.waiting), "barriers": self.barriers,
                "recent": {w: [list(p) for p in pushes] for w, pushes in self.recent.items()},
                "interval": dict(self.interval), "plan": self.plan,
                "noise": {w: list(mv) for w, mv in self.noise.items()}, "error": dict(self.error)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.released, self.barriers = int(state["released"]), int(state["barriers"])
        self.arrivals = {int(b): {int(w): float(t) for w, t in arrived.items()}
                         for b, arrived in state["arrivals"].items()}
        self.waiting = {int(w): int(b) for w, b in state["waiting"].items()}
        self.recent = {int(w): [(int(c), float(t)) for c, t in pushes] for w, pushes in state["recent"].items()}
        self.interval = {int(w): float(d) for w, d in state.get("interval", {}).items()}
        self.noise = {int(w): (float(m), float(v)) for w, (m, v) in state.get("noise", {}).items()}
        self.error = {int(w): float(e) for w, e in state.get("error", {}).items()}
        self.plan = state["plan"]
