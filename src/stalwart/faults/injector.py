"""The fault injector: the driver's schedule of kills and restarts.

The driver calls :meth:`FaultInjector.tick` from its loop with the elapsed training time
and the global clock; the injector kills what is due (SIGKILL through the launcher),
restarts what has been down long enough, and logs both as events, which the summary
and the plots turn into the kill markers and the ``kills`` list.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field
from typing import Callable

from ..metrics import EventLog
from .kills import KillRule


@dataclass
class _Pending:
    rule: KillRule
    done: bool = False
    restart_at: float | None = None


@dataclass
class FaultInjector:
    rules: list[KillRule]
    launcher: object
    log: EventLog
    default_down_s: float | None = None
    # (position, shard) -> the server process there now, for head/middle/tail rules
    locate: Callable[[str, int], int | None] | None = None
    pending: list[_Pending] = field(init=False)
    down: dict[tuple[str, int], float] = field(default_factory=dict)  # role -> restart time (inf: never)

    def __post_init__(self) -> None:
        self.pending = [_Pending(r) for r in self.rules]

    def next_due_s(self) -> float:
        """The next wall time at which something is due (clock rules are polled)."""
        times = [p.rule.at_s for p in self.pending if not p.done and p.rule.at_s is not None]
        times += [t for t in self.down.values() if t != math.inf]
        return min(times, default=math.inf)

    def waiting_on_clock(self) -> bool:
        return any(not p.done and p.rule.at_clock is not None for p in self.pending)

    def tick(self, elapsed_s: float, clock: int | None) -> list[tuple[str, int]]:
        """Restart and kill what is due; returns the roles killed now."""
        killed = []
        for key, when in list(self.down.items()):
            if elapsed_s >= when:
                del self.down[key]
                pid = self.launcher.start(*key)
                self.log.emit("restart", member_role=key[0], member_index=key[1], at_s=elapsed_s, pid=pid)
        for p in self.pending:
            r = p.rule
            due = (r.at_s is not None and elapsed_s >= r.at_s) or \
                  (r.at_clock is not None and clock is not None and clock >= r.at_clock)
            if p.done or not due:
                continue
            p.done = True
            key = (r.role, r.index)
            if r.role in ("head", "middle", "tail"):
                index = self.locate(r.role, r.index) if self.locate is not None else None
                key = ("server", index if index is not None else -1)
            if key not in self.launcher.running():
                self.log.emit("kill_skipped", member_role=r.role, member_index=r.index, at_s=elapsed_s,
                              reason="not running")
                continue
            down = r.down_s if r.down_s is not None else self.default_down_s
            self.down[key] = math.inf if down is None else elapsed_s + down
            # Logged before the signal: what the kill causes elsewhere (a worker's report,
            # the coordinator removing a replica within a millisecond) must not be stamped
            # earlier than the kill itself, or "seconds since the kill" cannot find it.
            self.log.emit("kill", member_role=key[0], member_index=key[1], at_s=elapsed_s, clock=clock,
                          rule=r.describe(), down_s=down)
            self.launcher.kill(*key, signal.SIGKILL)
            killed.append(key)
        return killed

    def expects_exit(self, role: str, index: int) -> bool:
        """Was this role's death ours? Then the job goes on."""
        return (role, index) in self.down
