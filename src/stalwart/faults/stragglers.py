"""Stragglers: workers made slow the ways real clusters make them slow.

A rule reads ``TARGET:SETTINGS[@WHEN]``:

* ``3:2.0``            worker 3 runs 2x slower for the whole run
* ``*:jitter=0.5``     every worker gets a random extra delay per iteration, exponential
                       with a mean of half its measured step time
* ``3:2.0,jitter=0.2`` both at once
* ``3:1.0@20s``        from 20 s after worker 3's first step, it runs at normal speed
* ``0:3.0@clock=500``  from its iteration 500, worker 0 runs 3x slower

Rules are applied in the order given; a later rule that is in force overrides the
settings it names, so ``3:2.0`` followed by ``3:1.0@20s`` is a straggler that recovers.

The slowdown is real: after computing its gradient, the worker sleeps ``(factor - 1)``
times the step it just measured (plus the jitter draw), so a 2x straggler takes twice
as long per iteration whatever the machine's load. Each change of speed is logged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_WHEN = re.compile(r"^(?:(?P<seconds>\d+(?:\.\d+)?)s|clock=(?P<clock>\d+))$")


@dataclass(frozen=True)
class StragglerRule:
    worker: int | None            # None: every worker
    factor: float | None = None   # run this many times slower (>= 1)
    jitter: float | None = None   # mean random delay, in measured step times
    after_s: float = 0.0          # in force from this many seconds after the first step...
    after_clock: int = 0          # ...and from this iteration on

    def applies_to(self, worker: int) -> bool:
        return self.worker is None or self.worker == worker

    def in_force(self, clock: int, elapsed_s: float) -> bool:
        return clock >= self.after_clock and elapsed_s >= self.after_s


def parse_straggler(spec: str) -> StragglerRule:
    """Parse one rule; a ValueError names what is wrong with it."""
    text = spec.strip()
    where = f"straggler {spec!r}"
    target, sep, rest = text.partition(":")
    if not sep or not rest:
        raise ValueError(f"{where}: expected WORKER:FACTOR[,jitter=J][@WHEN], e.g. 3:2.0 or *:jitter=0.5")
    if target == "*":
        worker = None
    elif target.isdigit():
        worker = int(target)
    else:
        raise ValueError(f"{where}: the worker must be an index or '*', got {target!r}")
    settings, _, when = rest.partition("@")
    values: dict[str, float] = {}
    for part in settings.split(","):
        key, eq, raw = part.partition("=")
        key, raw = (key.strip(), raw) if eq else ("factor", key)
        if key not in ("factor", "jitter"):
            raise ValueError(f"{where}: unknown setting {key!r}; use a factor or jitter=J")
        try:
            values[key] = float(raw)
        except ValueError:
            raise ValueError(f"{where}: {key} must be a number, got {raw!r}") from None
    if "factor" in values and not 1.0 <= values["factor"] <= 1000:
        raise ValueError(f"{where}: factor must lie in [1, 1000] (1 = normal speed), got {values['factor']}")
    if "jitter" in values and not 0.0 <= values["jitter"] <= 1000:
        raise ValueError(f"{where}: jitter must lie in [0, 1000], got {values['jitter']}")
    after_s, after_clock = 0.0, 0
    if when:
        m = _WHEN.match(when.strip())
        if m is None:
            raise ValueError(f"{where}: WHEN must be like 20s or clock=500, got {when!r}")
        if m["seconds"] is not None:
            after_s = float(m["seconds"])
        else:
            after_clock = int(m["clock"])
    return StragglerRule(worker, values.get("factor"), values.get("jitter"), after_s, after_clock)


class Straggler:
    """One worker's slowdown: how long to sleep after each step, and when speed changed."""

    def __init__(self, rules: list[StragglerRule], worker: int, seed: int = 0):
        self.rules = [r for r in rules if r.applies_to(worker)]
        self.rng = np.random.default_rng([seed, worker, 0x57A6])
        self.factor, self.jitter = 1.0, 0.0
        self.delay_s = 0.0  # total seconds slept so far

    def delay(self, step_s: float, clock: int, elapsed_s: float) -> tuple[float, dict | None]:
        """Seconds to sleep after a step of ``step_s``; and the new speed, if it changed."""
        factor, jitter = 1.0, 0.0
        for rule in self.rules:
            if rule.in_force(clock, elapsed_s):
                factor = rule.factor if rule.factor is not None else factor
                jitter = rule.jitter if rule.jitter is not None else jitter
        change = None
        if (factor, jitter) != (self.factor, self.jitter):
            self.factor, self.jitter = factor, jitter
            change = {"factor": factor, "jitter": jitter, "clock": clock, "elapsed_s": elapsed_s}
        seconds = (factor - 1.0) * step_s
        if jitter:
            seconds += self.rng.exponential(jitter * step_s)
        self.delay_s += seconds
        return seconds, change
