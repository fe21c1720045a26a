"""``stalwart experiment sync``: the five sync policies against the same stragglers.

Every policy trains the same model on the same data with the same straggler pattern,
for the same wall time, once per seed. For each pattern the experiment writes into its
own folder:

* ``accuracy.png``  test accuracy against wall time, mean and min-max band over seeds;
* ``time_to_bsp.png``  a bar per policy: the time it took to reach BSP's final accuracy;
* ``time_split.png``  each worker's time, per policy, split into computing, the injected
  straggler delay, communication and waiting at the policy's gate;
* ``results.md`` and ``results.json``  per policy: time to the target accuracy, time to
  BSP's final accuracy (the paper's comparison), final accuracy, updates per second,
  iterations and barrier wait per worker, mean staleness of applied gradients, and for
  ElasticBSP the mean predicted (the paper's, and the noise-aware) and actual wait;
* ``runs/``  every job's own run directory, with its logs, summary and plot.

Two presets. ``demo`` is the small workload that runs in minutes: MNIST-1D and the 1-D
CNN, communication-bound (about 3 ms of compute against 5 ms of push+pull here), one 2x
straggler. ``paper`` is the seed paper's regime: its CNN on FashionMNIST, 4 workers,
compute-bound (about 40 ms of compute against 10 ms of communication per step here),
SGD at the paper's lr 0.01 and batch 32, under the three kinds of straggler the paper
studies: one 2x straggler, random per-iteration jitter on every worker, and a change
of speed halfway (the straggler recovers and another worker slows down).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..config import JobConfig  # noqa: E402
from ..data.datasets import FASHION_MNIST_DIR  # noqa: E402
from ..metrics.plots import legend_beside, line_styles  # noqa: E402
from .common import Case, accuracy_band, first_time_at, markdown_table, mean, pm, run_cases, spread  # noqa: E402

POLICIES = ["bsp", "asp", "ssp:3", "dssp:2:4", "elastic:15"]


def patterns(duration_s: float) -> dict[str, tuple[str, ...]]:
    """The straggler patterns of the paper's study, for runs of ``duration_s``."""
    half = f"{duration_s / 2:g}s"
    return {
        "straggler": ("3:2.0",),                          # one worker at half speed throughout
        "jitter": ("*:jitter=0.5",),                      # every step of every worker: + Exp(0.5 step)
        "shift": ("3:2.0", f"3:1.0@{half}", f"0:2.0@{half}"),  # halfway, worker 3 recovers, 0 slows
    }


@dataclass(frozen=True)
class Preset:
    """One workload and its grid: what ``--preset`` chooses and every flag may override."""
    dataset: str
    model: str
    batch_size: int
    lr: float
    target: float
    duration_s: float
    seeds: int
    patterns: tuple[str, ...]
    policies: tuple[str, ...]
    data_dir: str | None = None
    quick: dict = field(default_factory=dict)   # what --quick changes

    def with_quick(self) -> "Preset":
        return Preset(**{**self.__dict__, **self.quick, "quick": {}})


PRESETS = {
    "demo": Preset("mnist1d", "cnn1d", 64, 0.05, 0.9, 40.0, 3, ("straggler",), tuple(POLICIES),
                   quick={"seeds": 1, "duration_s": 12.0}),
    # lr 0.01, batch 32: the paper's. R = 60: the sweep over 15, 30, 60, 150 in docs/results/sync-paper-r.
    "paper": Preset("fashion-mnist", "papercnn", 32, 0.01, 0.85, 120.0, 3, ("straggler", "jitter", "shift"),
                    ("bsp", "asp", "ssp:3", "dssp:2:4", "elastic:60", "elastic:60:5"),
                    data_dir=str(FASHION_MNIST_DIR),
                    quick={"seeds": 1, "duration_s": 20.0, "patterns": ("straggler",),
                           "policies": ("bsp", "elastic:60")}),
}


def base_config(workers: int = 4, servers: int = 2, stragglers: tuple[str, ...] = ("3:2.0",),
                duration_s: float = 40.0, target: float = 0.9, batch_size: int = 64,
                dataset: str = "mnist1d", model: str = "cnn1d", lr: float = 0.05,
                data_dir: str | None = None) -> dict:
    """The shared workload: by default MNIST-1D and the 1-D CNN, one 2x straggler among 4 workers."""
    return {
        "cluster": {"workers": workers, "servers": servers},
        "data": {"dataset": dataset, "batch_size": batch_size, "data_dir": data_dir},
        "model": {"name": model},
        "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.9},
        # Each periodic pass scores a fixed draw of 2,000 test examples (the last scores
        # all): the paper's 10,000 every half second would take a core from the workers.
        "train": {"duration_s": duration_s, "target_accuracy": target,
                  "eval_interval_s": 0.5 if duration_s <= 60 else 1.0, "eval_subset": 2000},
        "faults": {"stragglers": list(stragglers)},
        "progress": False,
    }


def run_patterns(out: Path, preset: Preset, bases: dict[str, dict]) -> dict[str, dict]:
    """Every pattern's grid in ``out/PATTERN/``, and ``out/results.md`` with every table."""
    results = {}
    for name, base in bases.items():
        results[name] = run_sync_experiment(out / name, list(preset.policies), preset.seeds, base)
    (out / "results.md").write_text("".join(f"## {name}\n\n{render_markdown(r)}\n" for name, r in results.items()))
    return results


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
    plot_time_to_bsp(result, out / "time_to_bsp.png")
    plot_time_split(result, out / "time_split.png")
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
        splits = [s["time_split_per_worker"] for s in ok if s.get("time_split_per_worker")]
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
            "barrier_expected_wait_s": mean([s.get("barrier_expected_wait_s") for s in ok]),
            "time_split_per_worker": _mean_split(splits),
            "barrier_actual_wait_s": mean([s.get("barrier_actual_wait_s") for s in ok]),
        })
    return {"target_accuracy": target, "bsp_final_accuracy": bsp_final, "bsp_time_to_final_s": bsp_time,
            "workload": base, "policies": rows,
            "runs": [{k: v for k, v in s.items() if k not in ("curve", "local_curve")} for s in summaries]}


SPLIT = (("compute_s", "compute"), ("straggler_s", "straggler delay"), ("comm_s", "communication"),
         ("wait_s", "waiting at the gate"))


def _mean_split(splits: list[list[dict]]) -> list[dict]:
    """Per worker, the mean over runs of each part of its time."""
    if not splits:
        return []
    workers = min(len(s) for s in splits)
    return [{key: float(np.mean([s[i][key] for s in splits])) for key, _ in SPLIT} for i in range(workers)]


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
        ("barrier wait ms: paper's / expected / actual", _barrier_cell),
    ])
    return head + table


def _barrier_cell(row: dict) -> str:
    ms = lambda v: "-" if v is None else f"{1000 * v:.1f}"  # noqa: E731
    if not row.get("barriers"):
        return "-"
    return " / ".join(ms(row.get(k)) for k in ("barrier_predicted_wait_s", "barrier_expected_wait_s",
                                                "barrier_actual_wait_s"))


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


def plot_time_to_bsp(result: dict, path: Path) -> Path:
    """A bar per policy: seconds to reach BSP's final accuracy (a hatched stub: never)."""
    rows = result["policies"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    times = [r["time_to_bsp_final_s"] for r in rows]
    top = max([t for t in times if t is not None] or [1.0])
    for i, (r, t) in enumerate(zip(rows, times)):
        if t is None:
            ax.bar(i, top * 0.05, color="white", edgecolor="grey", hatch="//")
            ax.annotate("never", (i, top * 0.05), ha="center", va="bottom", fontsize=8)
        else:
            ax.bar(i, t, color="tab:blue" if r["policy"] != "bsp" else "tab:gray")
            speed = r["speedup_to_bsp_final"]
            ax.annotate(f"{t:.0f} s" + ("" if speed is None else f"\n{speed:.2f}x"), (i, t),
                        ha="center", va="bottom", fontsize=8)
    final = result["bsp_final_accuracy"]
    ax.set_xticks(range(len(rows)), [r["policy"] for r in rows], fontsize=8)
    ax.set(ylabel="seconds", ylim=(0, top * 1.3),
           title=f"time to BSP's final accuracy ({'-' if final is None else f'{final:.3f}'}), mean over seeds")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_time_split(result: dict, path: Path) -> Path:
    """Stacked bars: per policy, each worker's seconds of compute, straggler delay,
    communication and waiting (mean over seeds)."""
    rows = [r for r in result["policies"] if r["time_split_per_worker"]]
    fig, ax = plt.subplots(figsize=(9, 4))
    colors = dict(zip((k for k, _ in SPLIT), ("tab:green", "tab:olive", "tab:blue", "tab:red")))
    ticks, labels, x = [], [], 0.0
    for r in rows:
        first = x
        for w, split in enumerate(r["time_split_per_worker"]):
            bottom = 0.0
            for key, name in SPLIT:
                ax.bar(x, split[key], bottom=bottom, color=colors[key], width=0.8,
                       label=name if not ticks else None)
                bottom += split[key]
            ticks.append(x)
            labels.append(f"w{w}")
            x += 1
        # the policy's name centred under its workers' bars
        ax.annotate(r["policy"], ((first + x - 1) / 2, 0), xycoords=("data", "axes fraction"),
                    xytext=(0, -22), textcoords="offset points", ha="center", va="top", fontsize=8)
        x += 0.8  # a gap between policies
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.set(ylabel="seconds per worker", title="where each worker's time went (mean over seeds)")
    ax.grid(axis="y", alpha=0.3)
    legend_beside(ax, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
