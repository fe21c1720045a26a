"""Dynamic stale synchronous parallel, ``dssp:S:R`` (Zhao et al., 2019).

Like ``ssp:S``, but a fast worker that reaches the bound may be granted up to ``R``
extra clocks, chosen from the workers' recent iteration times so that it waits least:
when worker ``w`` first runs ``S`` clocks ahead of the slowest, the leader predicts the
slowest worker's next push (its last push time plus its last interval) and grants the
``r`` in ``[0, R]`` whose predicted push time of ``w`` (``t_w + r * interval_w``) lies
closest to it. The grant holds until the slowest worker advances, then is decided anew.
The effective bound thus moves within ``[S, S + R]`` with the workers' speeds.

Timing differs between shards, so only the leader (shard 0) decides; followers allow
the loosest bound ``S + R``. A worker waits for every shard's answer, so it is held
exactly as long as the leader decides, and staleness never exceeds ``S + R`` anywhere.

Joining and leaving are SSP's: a newcomer starts from the slowest worker's clock, and a
worker that leaves is no longer waited on.
"""

from __future__ import annotations

from .ssp import SSP


class DSSP(SSP):
    name = "dssp"

    def __init__(self, workers: int, shard_size: int, leader: bool = True, staleness: int = 3,
                 extra: int = 3):
        super().__init__(workers, shard_size, leader, staleness)
        if extra < 0:
            raise ValueError(f"dssp extra range must be >= 0, got {extra}")
        self.extra = extra
        self.last_push: dict[int, float] = {}
        self.interval: dict[int, float] = {}
        self.grants: dict[int, int] = {}   # worker -> extra clocks granted
        self._granted_at = -1               # slowest clock when the grants were made

    def on_timed_push(self, worker: int, clock: int, now: float, hint: dict | None) -> None:
        if worker in self.last_push:
            self.interval[worker] = now - self.last_push[worker]
        self.last_push[worker] = now
        if not self.leader:
            return
        slowest = self._slowest_clock()
        if slowest != self._granted_at:
            self.grants.clear()
            self._granted_at = slowest
        # Decide for every worker now held by the bound that has no grant in this round.
        for w in sorted(self.active):
            if w not in self.grants and self.clocks.get(w, -1) - slowest > self.staleness:
                self.grants[w] = self._grant(w, slowest)
                self._events.append(("dssp_grant", {"worker": w, "clock": self.clocks[w],
                                                    "slowest": slowest, "extra": self.grants[w]}))

    def _grant(self, worker: int, slowest_clock: int) -> int:
        laggards = [w for w in self.active if self.clocks.get(w, -1) == slowest_clock]
        if worker not in self.interval or not all(w in self.interval for w in laggards):
            return 0  # nothing to predict from yet: behave as SSP
        due = max(self.last_push[w] + self.interval[w] for w in laggards)
        mine, step = self.last_push[worker], self.interval[worker]
        return min(range(self.extra + 1), key=lambda r: (abs(mine + r * step - due), r))

    def bound(self, worker: int) -> int:
        if not self.leader:
            return self.staleness + self.extra
        if self._granted_at != self._slowest_clock():
            return self.staleness  # the slowest moved (or left): grants are decided anew
        return self.staleness + self.grants.get(worker, 0)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "last_push": dict(self.last_push), "interval": dict(self.interval),
                "grants": dict(self.grants), "granted_at": self._granted_at}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.last_push = {int(w): float(t) for w, t in state["last_push"].items()}
        self.interval = {int(w): float(t) for w, t in state["interval"].items()}
        self.grants = {int(w): int(r) for w, r in state["grants"].items()}
        self._granted_at = int(state["granted_at"])
