"""``stalwart experiment sync``: the five sync policies against the same stragglers.

Every policy trains the same model on the same data with the same straggler pattern,
for the same wall time, once per seed. The experiment writes into its folder:

* ``accuracy.png``  test accuracy against wall time, mean and min-max band over seeds;
* ``results.md`` and ``results.json``  per policy: time to the target accuracy, time to
  BSP's final accuracy (the paper's comparison), final accuracy, updates per second,
  iterations and barrier wait per worker, mean staleness of applied gradients;
* ``runs/``  every job's own run directory, with its logs, summary and plot.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..config import JobConfig  # noqa: E402
from ..metrics.plots import legend_beside, line_styles  # noqa: E402
from .common import Case, accuracy_band, first_time_at, markdown_table, mean, pm, run_cases, spread  # noqa: E402

POLICIES = ["bsp", "asp", "ssp:3", "dssp:2:4", "elastic:15"]
FULL = {"seeds": 3, "duration_s": 40.0}
QUICK = {"seeds": 1, "duration_s": 12.0}


def base_config(workers: int = 4, servers: int = 2, stragglers: tuple[str, ...] = ("3:2.0",),
                duration_s: float = 40.0, target: float = 0.9, batch_size: int = 64,
                dataset: str = "mnist1d", model: str = "cnn1d") -> dict:
    """The shared workload: by default MNIST-1D and the 1-D CNN, one 2x straggler among 4 workers."""
    return {
        "cluster": {"workers": workers, "servers": servers},
        "data": {"dataset": dataset, "batch_size": batch_size},
        "model": {"name": model},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "train": {"duration_s": duration_s, "target_accuracy": target, "eval_interval_s": 0.5},
        "faults": {"stragglers": list(stragglers)},
        "progress": False,
    }


def run_sync_experiment(out: Path, policies: list[str] = POLICIES, seeds: int = 3,
                        base: dict | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    base = base or base_config()
    cases = []
    for policy in policies:
        for seed in range(seeds):
            data = json.loads(json.dumps(base))
            data.update(sync={"policy": policy}, out=str(out / "runs"),
                        name=f"{policy.replace(':', '-')}-seed{seed}")
            data["train"]["seed"] = seed
            cases.append(Case(policy, seed, JobConfig.validate_dict(data)))
    started = time.time()
    summaries = run_cases(cases, out)
    result = aggregate(summaries, policies, base)
    result["wall_s"] = time.time() - started
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(render_markdown(result))
    plot(summaries, policies, base, out / "accuracy.png")
    return result


def aggregate(summaries: list[dict], policies: list[str], base: dict) -> dict:
    duration = base["train"]["duration_s"]
    target = base["train"]["target_accuracy"]
    grid = np.arange(0.0, duration + 0.25, 0.25)
    bands = {p: accuracy_band([s for s in summaries if s["group"] == p], grid) for p in policies}
    # The paper's comparison: how soon each policy reaches the accuracy BSP ends with.
    bsp_final = bands["bsp"][0][~np.isnan(bands["bsp"][0])][-1] if "bsp" in bands and \
        (~np.isnan(bands["bsp"][0])).any() else None
    bsp_time = first_time_at(grid, bands["bsp"][0], bsp_final) if bsp_final is not None else None
    rows = []
    for p in policies:
        runs = [s for s in summaries if s["group"] == p]
        ok = [s for s in runs if s.get("status") == "completed"]
        waits = np.array([s["wait_s_per_worker"] for s in ok if s.get("wait_s_per_worker")] or [[np.nan]])
        iters = np.array([s["iterations_per_worker"] for s in ok if s.get("iterations_per_worker")] or [[np.nan]])
        reach = [s.get("time_to_target_s") for s in ok]
        to_bsp = first_time_at(grid, bands[p][0], bsp_final) if bsp_final is not None else None
        rows.append({
            "policy": p, "runs": len(runs), "completed": len(ok),
            "reached_target": sum(r is not None for r in reach),
            "time_to_target_s": mean(reach), "time_to_target_sd": spread(reach),
            "time_to_bsp_final_s": to_bsp,
            "speedup_to_bsp_final": (bsp_time / to_bsp) if bsp_time and to_bsp else None,
            "final_accuracy": mean([s.get("final_accuracy") for s in ok]),
            "final_accuracy_sd": spread([s.get("final_accuracy") for s in ok]),
            "updates_per_s": mean([s.get("updates_per_s") for s in ok]),
            "iterations_per_worker": [round(float(v), 1) for v in np.nanmean(iters, 0)],
            "wait_s_per_worker": [round(float(v), 2) for v in np.nanmean(waits, 0)],
            "mean_staleness": mean([s.get("mean_staleness") for s in ok]),
            "barriers": mean([s.get("barriers") for s in ok]),
            "barrier_predicted_wait_s": mean([s.get("barrier_predicted_wait_s") for s in ok]),
            "barrier_actual_wait_s": mean([s.get("barrier_actual_wait_s") for s in ok]),
        })
    return {"target_accuracy": target, "bsp_final_accuracy": bsp_final, "bsp_time_to_final_s": bsp_time,
            "workload": base, "policies": rows,
            "runs": [{k: v for k, v in s.items() if k not in ("curve", "local_curve")} for s in summaries]}


def render_markdown(result: dict) -> str:
    w = result["workload"]
    bsp_final = result["bsp_final_accuracy"]
    head = (f"Workload: {w['data']['dataset']} / {w['model']['name']}, {w['cluster']['workers']} workers, "
            f"{w['cluster']['servers']} servers, batch {w['data']['batch_size']}, "
            f"{w['train']['duration_s']:g} s per run, stragglers {', '.join(w['faults']['stragglers']) or 'none'}. "
            f"Target accuracy {result['target_accuracy']}; BSP's final accuracy "
            f"{'-' if bsp_final is None else format(bsp_final, '.3f')}.\n\n")
    sec = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    table = markdown_table(result["policies"], [
        ("policy", lambda r: f"`{r['policy']}`"),
        ("runs ok", lambda r: f"{r['completed']}/{r['runs']}"),
        ("time to target s", lambda r: f"{pm(r['time_to_target_s'], r['time_to_target_sd'], 1)}"
                                       f" ({r['reached_target']}/{r['completed']})"),
        ("time to BSP's final s", lambda r: sec(r["time_to_bsp_final_s"])),
        ("vs BSP", lambda r: "-" if r["speedup_to_bsp_final"] is None else f"{r['speedup_to_bsp_final']:.2f}x"),
        ("final accuracy", lambda r: pm(r["final_accuracy"], r["final_accuracy_sd"])),
        ("updates/s", lambda r: sec(r["updates_per_s"])),
        ("iterations per worker", lambda r: " / ".join(f"{v:.0f}" for v in r["iterations_per_worker"])),
        ("barrier wait s per worker", lambda r: " / ".join(f"{v:.1f}" for v in r["wait_s_per_worker"])),
        ("mean staleness", lambda r: "-" if r["mean_staleness"] is None else f"{r['mean_staleness']:.2f}"),
    ])
    return head + table


def plot(summaries: list[dict], policies: list[str], base: dict, path: Path) -> Path:
    grid = np.arange(0.0, base["train"]["duration_s"] + 0.25, 0.25)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    styles = line_styles(policies)
    for p in policies:
        m, lo, hi = accuracy_band([s for s in summaries if s["group"] == p], grid)
        ax.plot(grid, m, label=p, **styles[p])
        ax.fill_between(grid, lo, hi, color=styles[p]["color"], alpha=0.15, lw=0)
    target = base["train"]["target_accuracy"]
    if target is not None:
        ax.axhline(target, color="grey", ls=":", lw=1)
    stragglers = ", ".join(base["faults"]["stragglers"]) or "none"
    ax.set(xlabel="wall time since training started (s)", ylabel="test accuracy",
           title=f"sync policies, stragglers: {stragglers} (mean, min-max over seeds)", ylim=(0, 1))
    ax.grid(alpha=0.3)
    legend_beside(ax, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
