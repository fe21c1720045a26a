"""Kills: SIGKILL a role at a wall time or at a global clock, and maybe bring it back.

A rule reads ``ROLE:INDEX@WHEN[,down=DURATION]``:

* ``server:0@30s``          kill server 0 thirty seconds after training started
* ``worker:2@clock=200``    kill worker 2 once the job's global clock reaches 200
* ``server:1@20s,down=5s``  ...and restart it five seconds later
* ``head:0@10s``            with chain replication: whichever process heads shard 0's
                            chain at that moment (also ``middle:0``, ``tail:0``)
* ``coordinator:0@10s,down=2s``  the control plane itself: training goes on without it,
                            and the restarted coordinator rebuilds its state from the
                            roles (with etcd standbys, ``coordinator:K`` needs no restart:
                            a standby takes over)

The global clock is the slowest live worker's iteration count, as the workers report
it on their heartbeats. ``down`` defaults to the job's ``faults.down_s``; without
either, a killed role stays dead. The kills are real: the launcher sends SIGKILL to the
role's process, which gets no chance to clean up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_RULE = re.compile(r"^(?P<role>server|worker|coordinator|head|middle|tail):(?P<index>\d+)@(?:(?P<seconds>\d+(?:\.\d+)?)s|clock=(?P<clock>\d+))"
                   r"(?:,down=(?P<down>\d+(?:\.\d+)?)s)?$")


@dataclass(frozen=True)
class KillRule:
    role: str
    index: int
    at_s: float | None = None
    at_clock: int | None = None
    down_s: float | None = None   # None: the job's default

    def describe(self) -> str:
        when = f"{self.at_s:g}s" if self.at_s is not None else f"clock={self.at_clock}"
        return f"{self.role}:{self.index}@{when}"


def parse_kill(spec: str) -> KillRule:
    m = _RULE.match(spec.strip())
    if m is None:
        raise ValueError(f"kill {spec!r}: expected ROLE:INDEX@WHEN[,down=Ns] with ROLE server, worker, "
                         f"coordinator (or head, middle, tail of a shard's chain) "
                         f"and WHEN like 30s or clock=200, e.g. server:0@30s,down=5s")
    return KillRule(m["role"], int(m["index"]),
                    float(m["seconds"]) if m["seconds"] is not None else None,
                    int(m["clock"]) if m["clock"] is not None else None,
                    float(m["down"]) if m["down"] is not None else None)
