"""``stalwart bench anchors``: stalwart against the parameter servers people write, and
against what the machine can do at all, in one run on one machine.

For every model size and worker count it measures push+pull throughput (MB/s of
parameter bytes moved, both directions, all workers) of:

* stalwart over TCP (sockets only), over shared memory, and over LTP on loopback (the
  real coordinator and server processes, ASP, plain SGD: :mod:`..pushpull`);
* a ``torch.distributed.rpc`` parameter server (:mod:`.torch_rpc`);
* a Ray actor parameter server (:mod:`.ray_actor`), where Ray is installed;
* and two limits: one loopback TCP stream and one core's memcpy.

Each row is one measurement of ``seconds`` (no repeats); the table gives ratios of
stalwart's best path to each anchor and of its TCP path to the TCP limit.
"""

from __future__ import annotations

import traceback
from typing import Callable

from .. import pushpull
from ..limits import memcpy_mb_per_s, raw_tcp_mb_per_s
from . import ray_actor, torch_rpc

STALWART = ("stalwart/tcp", "stalwart/shm", "stalwart/ltp")
ANCHORS = ("torch-rpc", "ray-actor")
SYSTEMS = STALWART + ANCHORS


def _measurers() -> dict[str, Callable[[int, int, float], dict]]:
    def stalwart(path: str):
        return lambda params, workers, seconds: pushpull.measure(params, workers, 1, path, seconds)
    return {"stalwart/tcp": stalwart("tcp"), "stalwart/shm": stalwart("shm"), "stalwart/ltp": stalwart("ltp"),
            "torch-rpc": torch_rpc.measure, "ray-actor": ray_actor.measure}


def run_anchors(sizes: list[int], workers: list[int], seconds: float = 3.0,
                systems: tuple[str, ...] = SYSTEMS, progress: Callable[[str], None] | None = None) -> dict:
    say = progress or (lambda _line: None)
    limits = {"raw-tcp": raw_tcp_mb_per_s(seconds), "memcpy": memcpy_mb_per_s(seconds)}
    say(f"limits: one loopback TCP stream {limits['raw-tcp']:.0f} MB/s, memcpy {limits['memcpy']:.0f} MB/s")
    measurers = _measurers()
    skipped = {}
    if "ray-actor" in systems and (why := ray_actor.available()) is not None:
        skipped["ray-actor"] = why
    rows = []
    # Ray last, in a pass of its own: its processes take a while to go after
    # ray.shutdown() and would share the CPU with whatever is measured next.
    order = [s for s in systems if s != "ray-actor"] + [s for s in systems if s == "ray-actor"]
    for system in order:
        for size in sizes:
            for w in workers:
                if system in skipped:
                    continue
                row = {"system": system, "params": size, "workers": w}
                try:
                    result = measurers[system](size, w, seconds)
                    row.update(mb_per_s=result["mb_per_s"], round_trips=result["round_trips"],
                               seconds=result["seconds"])
                except Exception as exc:  # one failing system must not lose the others' rows
                    row.update(mb_per_s=None, error=f"{type(exc).__name__}: {exc}")
                    traceback.print_exc()
                rows.append(row)
                say(f"  {size:>11,} params  {w} workers  {system:<13} "
                    + (f"{row['mb_per_s']:8.0f} MB/s" if row["mb_per_s"] is not None else row["error"]))
    rows += [{"system": name, "params": size, "workers": w, "mb_per_s": value, "limit": True}
             for size in sizes for w in workers for name, value in limits.items()]
    return {"seconds": seconds, "limits": limits, "skipped": skipped, "rows": rows}


def _get(rows: list[dict], system: str, size: int, w: int) -> float | None:
    return next((r["mb_per_s"] for r in rows if r["system"] == system and r["params"] == size
                 and r["workers"] == w), None)


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def render_markdown(result: dict) -> str:
    rows = result["rows"]
    configs = sorted({(r["params"], r["workers"]) for r in rows})
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in rows)] + ["raw-tcp", "memcpy"]
    head = ["params", "workers"] + [f"{s} MB/s" for s in systems] + [
        "best stalwart / torch-rpc", "best stalwart / ray-actor", "tcp / raw TCP", "shm / raw TCP", "shm / memcpy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for size, w in configs:
        values = {s: _get(rows, s, size, w) for s in systems}
        best = max((values[s] for s in STALWART if values.get(s) is not None), default=None)
        cells = [f"{size / 1e6:g}M", str(w)] + ["-" if values[s] is None else f"{values[s]:.0f}" for s in systems]
        cells += [ratio(best, values.get("torch-rpc")), ratio(best, values.get("ray-actor")),
                  ratio(values.get("stalwart/tcp"), values["raw-tcp"]),
                  ratio(values.get("stalwart/shm"), values["raw-tcp"]),
                  ratio(values.get("stalwart/shm"), values["memcpy"])]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"\n{result['seconds']:g} s per measurement, one run each."]
    notes += [f"{name}: skipped ({why})." for name, why in result["skipped"].items()]
    return "\n".join(lines + notes) + "\n"
