"""``stalwart bench scaling``: how push+pull throughput grows with workers and servers,
and how the time of one push+pull grows with the model.

Two sweeps of :func:`~stalwart.bench.pushpull.measure` (real processes, ASP, plain
SGD): workers x servers at one model size, then model sizes at one worker and one
server. It writes ``results.json``, ``results.md`` and ``scaling.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .pushpull import measure  # noqa: E402


def run_scaling(params: int, workers: list[int], servers: list[int], sizes: list[int], path: str = "shm",
                seconds: float = 3.0, progress: Callable[[str], None] | None = None) -> dict:
    say = progress or (lambda _line: None)
    rows = []

    def one(sweep: str, size: int, w: int, s: int) -> None:
        r = measure(size, w, s, path, seconds)
        rows.append({"sweep": sweep, "path": path, "params": size, "workers": w, "servers": s,
                     "mb_per_s": r["mb_per_s"], "ms_per_round": r["ms_per_round"],
                     "round_trips": r["round_trips"]})
        say(f"  {sweep:<5} {size:>11,} params  {w} workers  {s} servers: {r['mb_per_s']:8.0f} MB/s, "
            f"{r['ms_per_round']:.1f} ms per push+pull")

    for s in servers:
        for w in workers:
            one("grid", params, w, s)
    for size in sizes:
        one("size", size, 1, 1)
    return {"path": path, "seconds": seconds, "rows": rows}


def render_markdown(result: dict) -> str:
    grid = [r for r in result["rows"] if r["sweep"] == "grid"]
    size = [r for r in result["rows"] if r["sweep"] == "size"]
    workers = sorted({r["workers"] for r in grid})
    lines = []
    if grid:
        lines += [f"Aggregate MB/s, {grid[0]['params']:,} parameters over {result['path']}:\n",
                  "| servers | " + " | ".join(f"{w} workers" for w in workers) + " |",
                  "|---:|" + "---:|" * len(workers)]
        for s in sorted({r["servers"] for r in grid}):
            cells = {r["workers"]: r["mb_per_s"] for r in grid if r["servers"] == s}
            lines.append(f"| {s} | " + " | ".join(f"{cells[w]:.0f}" if w in cells else "-" for w in workers) + " |")
    if size:
        lines += ["", "One worker, one server:\n", "| params | ms per push+pull | MB/s |", "|---:|---:|---:|"]
        lines += [f"| {r['params']:,} | {r['ms_per_round']:.1f} | {r['mb_per_s']:.0f} |" for r in size]
    return "\n".join(lines) + f"\n\n{result['seconds']:g} s per measurement, one run each.\n"


def plot(result: dict, path: Path) -> None:
    grid = [r for r in result["rows"] if r["sweep"] == "grid"]
    size = [r for r in result["rows"] if r["sweep"] == "size"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in sorted({r["servers"] for r in grid}):
        mine = sorted((r["workers"], r["mb_per_s"]) for r in grid if r["servers"] == s)
        left.plot([m[0] for m in mine], [m[1] for m in mine], marker="o", label=f"{s} server{'s' * (s > 1)}")
    left.set_xlabel("workers")
    left.set_ylabel("aggregate push+pull MB/s")
    if grid:
        left.set_title(f"{grid[0]['params']:,} parameters over {result['path']}")
        left.legend()
    right.loglog([r["params"] for r in size], [r["ms_per_round"] for r in size], marker="o")
    right.set_xlabel("parameters")
    right.set_ylabel("ms per push+pull (1 worker, 1 server)")
    right.set_title("time per round vs model size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(render_markdown(result))
    plot(result, out / "scaling.png")
