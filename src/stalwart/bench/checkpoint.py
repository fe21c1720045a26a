"""``stalwart bench checkpoint``: what checkpointing costs the update rate.

The same push+pull load as ``bench pushpull`` (real server processes, ASP, so every
push is one update), once without recovery and once with checkpoint recovery at a
given interval, alternating, several times. It reports updates per second of each,
the overhead, and what the servers spent on the update path (the in-memory snapshot)
and in the background (writing files).
"""

from __future__ import annotations

import statistics
import tempfile

from .pushpull import measure


def bench_checkpoint(params: int, workers: int, every_updates: int, seconds: float, repeats: int) -> dict:
    runs: dict[str, list[dict]] = {"none": [], "checkpoint": []}
    with tempfile.TemporaryDirectory(prefix="stalwart-ckpt-") as folder:
        for _ in range(repeats):
            for mode in runs:
                extra = {"recovery": {"strategy": mode, "every_updates": every_updates, "dir": folder}}
                runs[mode].append(measure(params, workers, 1, "tcp", seconds, extra))
    rate = {m: statistics.median(r["updates_per_s"] for r in rs) for m, rs in runs.items()}
    stats = [s for r in runs["checkpoint"] for s in r["server_stats"]]
    snapshots = sum(s.get("checkpoint_snapshots", 0) for s in stats)
    return {
        "params": params, "workers": workers, "every_updates": every_updates, "seconds": seconds,
        "repeats": repeats,
        "updates_per_s_none": rate["none"], "updates_per_s_checkpoint": rate["checkpoint"],
        "overhead": 1 - rate["checkpoint"] / rate["none"],
        "all_updates_per_s": {m: [r["updates_per_s"] for r in rs] for m, rs in runs.items()},
        "snapshots": snapshots, "persisted": sum(s.get("checkpoint_persisted", 0) for s in stats),
        "snapshot_ms": 1000 * sum(s.get("checkpoint_snapshot_s", 0.0) for s in stats) / snapshots if snapshots else None,
        "persist_ms": 1000 * sum(s.get("checkpoint_persist_s", 0.0) for s in stats) /
                      max(1, sum(s.get("checkpoint_persisted", 0) for s in stats)),
    }
