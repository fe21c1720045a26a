"""What the driver's live display shows: the cluster as one :class:`ClusterView` per
evaluation, and faults as they happen.

:class:`ClusterWatch` builds each view from three sources, none of which it owns: the
coordinator's membership and chains (``status``), the workers' heartbeat stats
(iteration, loss, and the state a worker reports: ``training``, ``waiting`` in a
push+pull, ``detached``), and the fault injector's schedule (a killed role is ``dead``,
or ``restarting`` with the time left). Between two views it notes what changed: a
server down or back, a chain that lost or gained a replica.
"""

from __future__ import annotations

from ..config import JobConfig
from ..faults import FaultInjector
from ..metrics.progress import ClusterView, Progress, ShardView, WorkerView


def _chain_text(chain: list[int]) -> str:
    return ("servers " + ", ".join(map(str, chain))) if chain else "no server"


class ClusterWatch:
    def __init__(self, config: JobConfig, progress: Progress, injector: FaultInjector, finished: set[int]):
        self.config, self.progress, self.injector, self.finished = config, progress, injector, finished
        self.barrier = not config.sync.policy.startswith("asp")  # a waiting worker waits at a barrier
        self._seen: dict[int, tuple[float, int]] = {}    # worker -> (elapsed, clock) at the last view
        self._chains: list[list[int]] | None = None
        self._servers_down: set[int] = set()

    def on_event(self, record: dict) -> None:
        """Faults as the injector makes them, for the live display."""
        kind, role, index = record["event"], record.get("member_role"), record.get("member_index")
        if kind == "kill":
            down = record.get("down_s")
            self.progress.note(record["at_s"], f"[red]kill[/red] {role} {index} ({record.get('rule')})"
                                               + ("" if down is None else f", back in {down:g}s"))
        elif kind == "restart":
            self.progress.note(record["at_s"], f"[magenta]restart[/magenta] {role} {index}")
        elif kind == "kill_skipped":
            self.progress.note(record["at_s"], f"kill of {role} {index} skipped: {record.get('reason')}")

    def view(self, status: dict, elapsed: float) -> ClusterView:
        """Who is doing what, from the coordinator's ``status`` answer; notes chain changes
        and servers lost or back since the last view."""
        members = {(m["role"], m["index"]): m for m in status["members"]}
        return ClusterView(self._workers(members, elapsed), self._shards(members, status, elapsed))

    def _workers(self, members: dict, elapsed: float) -> list[WorkerView]:
        workers = []
        # the job's own workers, and any that joined it
        joined = [i for role, i in members if role == "worker" and i >= self.config.cluster.workers]
        for w in range(max([self.config.cluster.workers - 1, *joined]) + 1):
            m = members.get(("worker", w)) or {}
            stats = m.get("stats") or {}
            clock = stats.get("clock")
            restart_at = self.injector.down.get(("worker", w))
            rate, seen = None, self._seen.get(w)
            if clock is not None and seen is not None and elapsed > seen[0] and clock >= seen[1]:
                rate = (clock - seen[1]) / (elapsed - seen[0])
            if clock is not None:
                self._seen[w] = (elapsed, clock)
            note = ""
            if restart_at is not None:
                state = "dead" if restart_at == float("inf") else "restarting"
                note = "" if state == "dead" else f"in {max(0.0, restart_at - elapsed):.0f}s"
            elif w in self.finished:
                state = "finished"
            elif not m:
                state = "starting"
            elif not m.get("alive"):
                state = "dead"
            else:
                state = stats.get("state", "training")
                if state == "waiting" and self.barrier:
                    state = "at barrier"
            workers.append(WorkerView(w, state, clock, rate if state not in ("dead", "restarting") else None,
                                      stats.get("loss"), note))
        return workers

    def _shards(self, members: dict, status: dict, elapsed: float) -> list[ShardView]:
        chains = [list(c) for c in status.get("chains") or []]
        down = {i for (role, i), m in members.items() if role == "server" and not m.get("alive")}
        down |= {i for (role, i) in self.injector.down if role == "server"}
        if self._chains is not None:
            for s, (old, new) in enumerate(zip(self._chains, chains)):
                # An empty chain is one not known yet (a restarted coordinator whose
                # servers have not all rejoined), not a change worth a line.
                if old != new and old and new:
                    self.progress.note(elapsed, f"shard {s} chain: {_chain_text(old)} [dim]now[/dim] "
                                                f"{_chain_text(new)}")
        for i in sorted(down - self._servers_down):
            self.progress.note(elapsed, f"server {i} [red]down[/red]")
        for i in sorted(self._servers_down - down):
            self.progress.note(elapsed, f"server {i} [green]back[/green]")
        self._chains, self._servers_down = chains, down
        replicas = self.config.recovery.replicas_per_shard
        shards = []
        for s in range(self.config.cluster.servers):
            servers = chains[s] if s < len(chains) and chains[s] else list(range(s * replicas, (s + 1) * replicas))
            versions = [(members.get(("server", i), {}).get("stats") or {}).get("version") for i in servers]
            known = [v for v in versions if v is not None]
            shards.append(ShardView(s, servers, {i for i in servers if i in down}, max(known) if known else None))
        return shards
