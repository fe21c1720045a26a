"""What every experiment shares: run a grid of jobs, aggregate seeds, write tables and plots."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from rich.console import Console

from ..config import JobConfig
from ..launch import Job, JobFailed

console = Console(stderr=True)


@dataclass
class Case:
    """One run of the grid: the group it belongs to (a row of the table) and its config."""
    group: str
    seed: int
    config: JobConfig
    netlab: dict | None = None  # NetLab arguments: run the job inside an emulated network


def run_cases(cases: list[Case], out: Path) -> list[dict]:
    """Run every case in turn; a failed run is recorded with its error and the grid goes on."""
    summaries = []
    for i, case in enumerate(cases, 1):
        console.print(f"[{i}/{len(cases)}] {case.group} seed {case.seed} ...", end=" ", highlight=False)
        try:
            summary = _run_case(case)
        except JobFailed as exc:
            summary = dict(exc.args[1] if len(exc.args) > 1 else {}, status="failed", error=str(exc.args[0]))
        summary.update(group=case.group, seed=case.seed)
        summaries.append(summary)
        acc = summary.get("final_accuracy")
        console.print(f"{summary.get('status')} final accuracy "
                      f"{'-' if acc is None else f'{acc:.3f}'}", highlight=False)
    (out / "summaries.json").write_text(json.dumps(summaries, indent=1))
    return summaries


def _run_case(case: Case) -> dict:
    if case.netlab is None:
        job = Job(case.config)
        try:
            return job.run()
        except JobFailed as exc:
            raise JobFailed(str(exc), job.summary or {}) from None
    from ..netlab import NetLab
    with NetLab(**case.netlab) as lab:
        config = case.config.model_copy(deep=True)
        config.cluster.host = lab.bridge_address  # driver and coordinator: on the lab's bridge
        job = Job(config, placement=lab.placement())
        try:
            summary = job.run()
        except JobFailed as exc:
            raise JobFailed(str(exc), dict(job.summary or {}, bottleneck=lab.bottleneck_stats())) from None
        return dict(summary, bottleneck=lab.bottleneck_stats())


def accuracy_band(summaries: list[dict], grid: np.ndarray,
                  hold_s: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max test accuracy over runs on a common time grid.

    Each run's last evaluation is held until the next one; with ``hold_s``, for at most
    that long, so that a time without evaluations (a dead server, a run that ended)
    stays a gap instead of a flat line."""
    rows = []
    for s in summaries:
        xs = np.array([p["elapsed_s"] for p in s.get("curve", [])])
        ys = np.array([p["accuracy"] for p in s.get("curve", [])])
        if not len(xs):
            continue
        at = np.searchsorted(xs, grid, side="right") - 1
        known = at >= 0
        if hold_s is not None:
            known &= grid - xs[np.clip(at, 0, None)] <= hold_s
        rows.append(np.where(known, ys[np.clip(at, 0, None)], np.nan))
    if not rows:
        empty = np.full(len(grid), np.nan)
        return empty, empty, empty
    m = np.array(rows)
    with warnings.catch_warnings():  # grid points before any run's first evaluation are empty
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(m, 0), np.nanmin(m, 0), np.nanmax(m, 0)


def first_time_at(grid: np.ndarray, values: np.ndarray, level: float) -> float | None:
    hit = np.flatnonzero(values >= level)
    return float(grid[hit[0]]) if len(hit) else None


def mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(kept) / len(kept) if kept else None


def spread(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.std(kept)) if len(kept) > 1 else None


def markdown_table(rows: list[dict], columns: list[tuple[str, Callable[[dict], str]]]) -> str:
    """``columns``: (header, cell) where ``cell(row)`` renders one value."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pm(value: float | None, sd: float | None, digits: int = 3) -> str:
    """``0.953 ± 0.004``; '-' when there is no value."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + ("" if sd is None else f" ± {sd:.{digits}f}")
