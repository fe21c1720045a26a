"""``stalwart experiment failure``: training through server failures, five ways.

The seed paper's experiment (DESIGN.md §1.1) done with several workers, seeds and real
SIGKILLs: the same job under each recovery strategy, with 0, 1 and 2 kills of the
server that shard 0's pushes go to (``server:0``; a chain's current head), each at a
fixed time and down for a fixed time. Strategies:

* ``none``: a dead server ends the job (its curve stops at the first kill);
* ``checkpoint``: snapshots every 100 updates, restored by the restarted server;
* ``chain/strong`` and ``chain/relaxed``: two replicas per shard, failover to the next;
* ``stateless`` (flush rule ``mean``), and ``stateless/<rule>`` for the other flush rules.

The experiment writes into its folder:

* ``accuracy.png``: test accuracy against wall time, one panel per kill count, mean and
  min-max band over seeds per strategy, kills and outages marked. A gap in a line is a
  time when the server's model could not be read (its server was down);
* ``results.md`` and ``table.json``: per strategy and kill count, final accuracy, time
  to the target, accuracy at the last evaluation before each kill and the first after
  recovery, recovery time, worker-seconds computed while a server was down, lost
  updates, CPU seconds and peak memory of the job's processes;
* ``results.json``: one row per run (``recovery``, ``kills``, ``seed``,
  ``final_accuracy``, ``time_to_target_s``, ``recovered_s``, ``compute_while_down_s``
  and more);
* ``runs/``: every job's own run directory.
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
from ..metrics.plots import legend_beside, line_styles, mark_outage  # noqa: E402
from .common import Case, accuracy_band, markdown_table, mean, pm, run_cases, spread  # noqa: E402

STRATEGIES = ["none", "checkpoint", "chain/strong", "chain/relaxed", "stateless"]
FLUSH_VARIANTS = ["stateless/sum", "stateless/staleness", "stateless/clip", "stateless/outer"]
FULL = {"seeds": 3, "duration_s": 30.0, "kill_at_s": (5.0, 15.0), "down_s": 5.0}
QUICK = {"seeds": 1, "duration_s": 14.0, "kill_at_s": (3.0, 8.0), "down_s": 2.0}


def base_config(workers: int = 4, servers: int = 2, duration_s: float = 30.0, target: float = 0.93,
                batch_size: int = 64, dataset: str = "mnist1d", model: str = "cnn1d",
                sync: str = "asp", lr: float = 0.05, data_dir: str | None = None) -> dict:
    """The shared workload: by default MNIST-1D, the 1-D CNN, 4 asynchronous workers, 2 shards."""
    return {
        "cluster": {"workers": workers, "servers": servers},
        "data": {"dataset": dataset, "batch_size": batch_size, "data_dir": data_dir},
        "model": {"name": model},
        "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.9},
        "sync": {"policy": sync},
        "train": {"duration_s": duration_s, "target_accuracy": target, "eval_interval_s": 0.5},
        "progress": False,
    }


def recovery_section(strategy: str) -> dict:
    """The ``recovery`` config of a strategy name such as ``chain/relaxed``."""
    kind, _, variant = strategy.partition("/")
    if kind == "none":
        return {"strategy": "none"}
    if kind == "checkpoint":
        return {"strategy": "checkpoint", "every_updates": 100}
    if kind == "chain":
        return {"strategy": "chain", "replicas": 2, "mode": variant or "strong", "every_updates": 100}
    if kind == "stateless":
        return {"strategy": "stateless", "flush_rule": variant or "mean"}
    raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES + FLUSH_VARIANTS}")


def kill_rules(strategy: str, kills: int, kill_at_s: tuple[float, ...]) -> list[str]:
    """``kills`` kills of the server shard 0's pushes go to (a chain's head, wherever it is)."""
    if kills > len(kill_at_s):
        raise ValueError(f"{kills} kills need {kills} kill times, got {list(kill_at_s)}")
    role = "head" if strategy.startswith("chain") else "server"
    return [f"{role}:0@{t:g}s" for t in kill_at_s[:kills]]


def run_failure_experiment(out: Path, strategies: list[str] = STRATEGIES, kill_counts: tuple[int, ...] = (0, 1, 2),
                           seeds: int = 3, base: dict | None = None, kill_at_s: tuple[float, ...] = (5.0, 15.0),
                           down_s: float = 5.0, variants: list[str] | None = None) -> dict:
    """``variants``: extra strategies (other flush rules) run only with one kill."""
    out.mkdir(parents=True, exist_ok=True)
    base = base or base_config()
    grid = [(s, k) for s in strategies for k in kill_counts] + [(v, 1) for v in variants or []]
    cases = []
    for strategy, kills in grid:
        for seed in range(seeds):
            data = json.loads(json.dumps(base))
            data.update(recovery=recovery_section(strategy), out=str(out / "runs"),
                        faults={"kills": kill_rules(strategy, kills, kill_at_s), "down_s": down_s},
                        name=f"{strategy.replace('/', '-')}-k{kills}-seed{seed}")
            data["train"]["seed"] = seed
            cases.append(Case(f"{strategy}|{kills}", seed, JobConfig.validate_dict(data)))
    started = time.time()
    summaries = run_cases(cases, out)
    runs = [run_row(s) for s in summaries]
    table = aggregate(runs, grid)
    meta = {"workload": base, "kill_at_s": list(kill_at_s), "down_s": down_s, "seeds": seeds,
            "cost_source": next((s["cost_source"] for s in summaries if s.get("cost_source")), None),
            "wall_s": time.time() - started}
    (out / "results.json").write_text(json.dumps(runs, indent=1))
    (out / "table.json").write_text(json.dumps({**meta, "rows": table}, indent=1))
    (out / "results.md").write_text(render_markdown(table, meta))
    plot(summaries, grid, base, kill_at_s, down_s, out / "accuracy.png")
    return {**meta, "rows": table, "runs": runs}


def run_row(summary: dict) -> dict:
    """One run as a row of ``results.json``."""
    strategy, kills = summary["group"].split("|")
    recovered = [k.get("recovered_s") for k in summary.get("kills") or []]
    return {
        "recovery": strategy, "kills": int(kills), "seed": summary["seed"], "status": summary.get("status"),
        "error": summary.get("error"),
        "final_accuracy": summary.get("final_accuracy"),
        "time_to_target_s": summary.get("time_to_target_s"),
        # seconds from a kill until updates resumed on that shard, averaged over the kills
        "recovered_s": mean(recovered) if recovered and None not in recovered else None,
        "recovered_s_per_kill": recovered,
        "accuracy_before_kill": [k.get("accuracy_before") for k in summary.get("kills") or []],
        "accuracy_after_recovery": [k.get("accuracy_after") for k in summary.get("kills") or []],
        "compute_while_down_s": summary.get("compute_while_down_s"),
        "lost_updates": summary.get("lost_updates"),
        "updates_applied": summary.get("updates_applied"),
        "worker_iterations": summary.get("worker_iterations"),
        "flushed_steps": summary.get("flushed_steps"),
        "cpu_s": summary.get("cpu_s"),
        "sum_rss_mb": summary.get("sum_rss_mb"),
        "cost_usd": summary.get("cost_usd"),
        "cost_to_target_usd": summary.get("cost_to_target_usd"),
        "bytes_by_path": summary.get("bytes_by_path"),
        "run_dir": summary.get("run_dir"),
    }


def aggregate(runs: list[dict], grid: list[tuple[str, int]]) -> list[dict]:
    rows = []
    for strategy, kills in grid:
        mine = [r for r in runs if r["recovery"] == strategy and r["kills"] == kills]
        ok = [r for r in mine if r["status"] == "completed"]
        per_kill = lambda key, i: mean([r[key][i] for r in mine if len(r[key]) > i])  # noqa: E731
        reach = [r["time_to_target_s"] for r in ok]
        rows.append({
            "recovery": strategy, "kills": kills, "runs": len(mine), "completed": len(ok),
            "final_accuracy": mean([r["final_accuracy"] for r in mine]),
            "final_accuracy_sd": spread([r["final_accuracy"] for r in mine]),
            "reached_target": sum(t is not None for t in reach),
            "time_to_target_s": mean(reach),
            "accuracy_before_kill": [per_kill("accuracy_before_kill", i) for i in range(kills)],
            "accuracy_after_recovery": [per_kill("accuracy_after_recovery", i) for i in range(kills)],
            "recovered_s": [per_kill("recovered_s_per_kill", i) for i in range(kills)],
            "compute_while_down_s": mean([r["compute_while_down_s"] for r in mine]),
            "lost_updates": mean([r["lost_updates"] for r in ok]),
            "updates_applied": mean([r["updates_applied"] for r in ok]),
            "cpu_s": mean([r["cpu_s"] for r in mine]),
            "sum_rss_mb": mean([r["sum_rss_mb"] for r in mine]),
            "cost_usd": mean([r.get("cost_usd") for r in mine]),
            # over the runs that reached the target: the price of getting there
            "cost_to_target_usd": mean([r.get("cost_to_target_usd") for r in ok]),
            "errors": sorted({r["error"] for r in mine if r["error"]}),
        })
    return rows


def render_markdown(table: list[dict], meta: dict) -> str:
    w = meta["workload"]
    head = (f"Workload: {w['data']['dataset']} / {w['model']['name']}, {w['cluster']['workers']} workers, "
            f"{w['cluster']['servers']} shards, {w['sync']['policy']}, batch {w['data']['batch_size']}, "
            f"{w['train']['duration_s']:g} s per run, {meta['seeds']} seed(s). Kills of shard 0's server at "
            f"{', '.join(f'{t:g} s' for t in meta['kill_at_s'])}, each down {meta['down_s']:g} s. "
            f"Target accuracy {w['train']['target_accuracy']}.\n\n")
    f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    pairs = lambda r: " ; ".join(f"{f(b)} → {f(a)}" for b, a in  # noqa: E731
                                 zip(r["accuracy_before_kill"], r["accuracy_after_recovery"])) or "-"
    return head + markdown_table(table, [
        ("recovery", lambda r: f"`{r['recovery']}`"),
        ("kills", lambda r: str(r["kills"])),
        ("runs ok", lambda r: f"{r['completed']}/{r['runs']}"),
        ("final accuracy", lambda r: pm(r["final_accuracy"], r["final_accuracy_sd"])),
        ("time to target s", lambda r: f"{f(r['time_to_target_s'], 1)} ({r['reached_target']}/{r['runs']})"),
        ("accuracy before kill → after recovery", pairs),
        ("recovered s", lambda r: " ; ".join(f(v, 2) for v in r["recovered_s"]) or "-"),
        ("compute while down, worker-s", lambda r: f(r["compute_while_down_s"], 1)),
        ("lost updates", lambda r: f(r["lost_updates"], 1)),
        ("updates", lambda r: f(r["updates_applied"], 0)),
        ("CPU s", lambda r: f(r["cpu_s"], 0)),
        ("peak RSS MB (all processes)", lambda r: f(r["sum_rss_mb"], 0)),
        ("cost (m$)", lambda r: f(None if r["cost_usd"] is None else 1000 * r["cost_usd"], 2)),
        ("cost to target (m$)", lambda r: f(None if r["cost_to_target_usd"] is None
                                            else 1000 * r["cost_to_target_usd"], 2)),
    ]) + f"\nCost: CPU seconds used and memory held, priced at {meta.get('cost_source', 'the default rates')} " \
         f"(m$: thousandths of a dollar; to target: pro rata of the training time it took).\n"


def plot(summaries: list[dict], grid: list[tuple[str, int]], base: dict, kill_at_s: tuple[float, ...],
         down_s: float, path: Path) -> Path:
    duration = base["train"]["duration_s"]
    times = np.arange(0.0, duration + 0.25, 0.25)
    hold = 2.5 * base["train"]["eval_interval_s"]  # longer without an evaluation: a gap
    counts = sorted({k for _, k in grid})
    fig, axes = plt.subplots(1, len(counts), figsize=(4.6 * len(counts) + 1.8, 4.3), sharey=True, squeeze=False)
    styles = line_styles([s for s, _ in grid])  # one style per strategy, the same in every panel
    for ax, kills in zip(axes[0], counts):
        for strategy in [s for s, k in grid if k == kills]:
            runs = [s for s in summaries if s["group"] == f"{strategy}|{kills}"]
            m, lo, hi = accuracy_band(runs, times, hold_s=hold)
            ax.plot(times, m, label=strategy, **styles[strategy])
            ax.fill_between(times, lo, hi, color=styles[strategy]["color"], alpha=0.12, lw=0)
            local = [{"curve": r.get("local_curve") or []} for r in runs]
            if any(r["curve"] for r in local):  # stateless: worker 0's own copy while detached
                lm, _, _ = accuracy_band(local, times, hold_s=hold)
                ax.plot(times, lm, color=styles[strategy]["color"], ls=":", lw=1.2)
        for i, t in enumerate(kill_at_s[:kills], 1):
            mark_outage(ax, t, t + down_s, f"kill {i}: down {down_s:g} s")
        ax.set(xlabel="wall time since training started (s)", title=f"{kills} kill(s) of shard 0's server",
               ylim=(0, 1))
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], label=s, **styles[s]) for s in styles]
    if any(s.get("local_curve") for s in summaries):
        handles.append(plt.Line2D([], [], color="black", ls=":", lw=1.2, label="dotted: worker 0's own copy\n"
                                                                               "while detached (stateless)"))
    legend_beside(axes[0][-1], handles=handles)
    axes[0][0].set_ylabel("test accuracy (mean, min-max over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
