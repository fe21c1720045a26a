"""``summary.json``: what a run achieved, computed from its event logs alone.

Because the summary is derived from the logs (never from a process's memory), a run
that was interrupted or lost a process still gets one, and ``stalwart report`` can
rebuild it at any time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .cost import CostRates, price
from .events import read_events


def _curve(events: list[dict]) -> list[dict]:
    """The test accuracy over time: the driver's evaluations of the servers' model, or,
    for a user's script (which evaluates itself), the accuracy its worker 0 logged with
    ``stalwart.log`` on the driver's clock."""
    curve = [{"elapsed_s": e["elapsed_s"], "accuracy": e["accuracy"], "loss": e["loss"],
              "version": e["version"]} for e in events if e["event"] == "eval"]
    start = _train_start(events)
    if curve or start is None:
        return curve
    return [{"elapsed_s": e["t"] - start, "accuracy": e["accuracy"], "loss": e.get("loss"), "version": e.get("clock")}
            for e in _script_metrics(events) if "accuracy" in e]


def _train_start(events: list[dict]) -> float | None:
    return next((e["t"] for e in events if e["event"] == "train_start"), None)


def _script_metrics(events: list[dict]) -> list[dict]:
    """What worker 0 of a script logged (``stalwart.log``), in order."""
    return [e for e in events if e["event"] == "metrics" and e.get("role") == "worker" and e.get("index") == 0]


def _last_metrics(events: list[dict]) -> dict[str, float]:
    """The last value of each scalar worker 0 of a script logged."""
    last: dict[str, float] = {}
    for e in _script_metrics(events):
        last.update({k: v for k, v in e.items() if k not in ("t", "role", "index", "event")})
    return last


def _local_curve(events: list[dict]) -> list[dict]:
    """Worker 0's scores of its own copy while its servers were down (stateless), on the
    driver's clock: seconds since training started."""
    start = _train_start(events)
    if start is None:
        return []
    return [{"elapsed_s": e["t"] - start, "accuracy": e["accuracy"], "loss": e["loss"], "clock": e.get("clock")}
            for e in events if e["event"] == "local_eval"]


def _barrier_accuracy(barriers: list[dict]) -> dict[str, Any]:
    """How well ElasticBSP's predictions held: mean predicted (the paper's, and the
    noise-aware expectation) and actual wait per worker."""
    if not barriers:
        return {}
    predicted = [v for b in barriers for v in b["predicted_wait_s"].values()]
    actual = [v for b in barriers for v in b["actual_wait_s"].values()]
    expected = [v for b in barriers for v in b.get("expected_wait_s", {}).values()]
    return {"barrier_predicted_wait_s": sum(predicted) / len(predicted),
            "barrier_expected_wait_s": sum(expected) / len(expected) if expected else None,
            "barrier_actual_wait_s": sum(actual) / len(actual),
            "zipline_s": sum(b["zipline_s"] for b in barriers) / len(barriers)}


def _time_split(workers: list[dict], wait_per_worker: list[float]) -> list[dict]:
    """Each worker's time, in seconds: computing, slept by an injected straggler delay,
    held at a gate by the sync policy (the servers' count) and the rest of its
    push+pulls (communication). A worker's own tally holds the step's bracket; the
    gate's hold lies inside its push+pull time, so it is taken out of communication."""
    split = []
    for w in sorted(workers, key=lambda e: e["index"]):
        i, delay = w["index"], w.get("delay_s", 0.0)
        wait = wait_per_worker[i] if i < len(wait_per_worker) else 0.0
        split.append({"worker": i, "compute_s": max(0.0, w.get("compute_s", 0.0) - delay), "straggler_s": delay,
                      "comm_s": max(0.0, w.get("comm_s", 0.0) - wait), "wait_s": wait})
    return split


def _accuracy_around(curve: list[dict], kill: dict) -> dict[str, float | None]:
    """Test accuracy at the last evaluation before a kill and the first after recovery."""
    before = [p["accuracy"] for p in curve if p["elapsed_s"] <= kill["at_s"]]
    back = kill["at_s"] + kill["recovered_s"] if kill["recovered_s"] is not None else None
    after = [p["accuracy"] for p in curve if back is not None and p["elapsed_s"] >= back]
    return {"accuracy_before": before[-1] if before else None, "accuracy_after": after[0] if after else None}


def _resources(events: list[dict]) -> dict[str, float | None]:
    """CPU seconds and peak memory of every role process (killed ones included)."""
    exits = [e for e in events if e["event"] == "role_exit" and e.get("cpu_s") is not None]
    if not exits:
        return {"cpu_s": None, "max_rss_mb": None, "sum_rss_mb": None}
    return {"cpu_s": sum(e["cpu_s"] for e in exits), "max_rss_mb": max(e["max_rss_mb"] for e in exits),
            # the footprint of the job's processes, had they all peaked at once
            "sum_rss_mb": sum(e["max_rss_mb"] for e in exits)}


def _evaluator(events: list[dict], roles_cpu_s: float | None) -> dict[str, float | None]:
    """What watching the job cost: the evaluator's CPU seconds (the driver's test
    passes), and their share of all the CPU the job's processes and the evaluator used."""
    passes = [e["cpu_s"] for e in events if e["event"] == "eval" and e.get("cpu_s") is not None]
    if not passes:
        return {"eval_passes": 0, "eval_cpu_s": None, "eval_cpu_share": None}
    spent = sum(passes)
    total = spent + (roles_cpu_s or 0.0)
    return {"eval_passes": len(passes), "eval_cpu_s": spent, "eval_cpu_share": spent / total if total > 0 else None}


def _stateless(events: list[dict]) -> dict[str, Any]:
    """Training through outages: compute done meanwhile, and what was flushed back."""
    stops = [e for e in events if e["event"] == "worker_stop"]
    flushed = [e for e in events if e["event"] == "flushed"]
    return {"compute_while_down_s": sum(e.get("compute_while_down_s", 0.0) for e in stops),
            "flushes": len(flushed),
            "flushed_steps": sum(e["count"] for e in flushed),
            "flush_staleness_max": max((e["staleness"] for e in flushed), default=None)}


def _kills(events: list[dict], replicas: int) -> tuple[list[dict], int]:
    """Each injected kill with its restart and recovery; and the updates lost in all.

    ``recovered_s``: seconds from the kill until updates were applied again through the
    killed role: for a server, by a server of its shard (its replacement, or with a
    chain the replica that took its place); for a worker, by any server after losing
    it. ``lost_updates``, for a server kill: the most, over the workers that had to
    reconnect, by which the version a worker last saw acknowledged by the shard exceeds
    the version it found there on reconnecting (None when no worker had to reconnect).
    ``removed_s``, for a chain replica: seconds until the coordinator took it out of its
    chain. ``control_back_s``, for a coordinator: seconds until a coordinator (restarted,
    or a standby) answered its first request, a member's rejoin.
    """
    kills, lost_total = [], 0
    for k in (e for e in events if e["event"] == "kill"):
        role, index, t = k["member_role"], k["member_index"], k["t"]
        shard = index // replicas
        after = [e for e in events if e["t"] > t]
        restart = next((e for e in after if e["event"] == "restart" and e["member_role"] == role
                        and e["member_index"] == index), None)
        resumed = next((e for e in after if e["event"] == "updates_resumed"
                        and (role == "worker" or e.get("shard") == shard)), None)
        entry = {"role": role, "index": index, "at_s": k["at_s"], "rule": k.get("rule"),
                 "down_s": k.get("down_s"), "restarted_at_s": restart["at_s"] if restart else None,
                 "recovered_s": (resumed["t"] - t) if resumed else None}
        if role == "coordinator":
            back = next((e for e in after if e["event"] == "member_rejoined"), None)
            entry["control_back_s"] = (back["t"] - t) if back else None
        if role == "server" and replicas > 1:
            removed = next((e for e in after if e["event"] == "replica_removed" and e["member_index"] == index), None)
            entry["removed_s"] = (removed["t"] - t) if removed else None
        if role == "server":
            entry["shard"] = shard
            later_kill = next((e["t"] for e in after if e["event"] == "kill"), float("inf"))
            found = [e for e in after if e["event"] == "reconnected" and e["shard"] == shard
                     and e["t"] < later_kill and e.get("found_version") is not None]
            entry["resumed_version"] = min((e["found_version"] for e in found), default=None)
            # Each worker against what it found itself: reconnections are staggered and
            # updates go on in between, so one worker's newer ack is no loss to another.
            entry["lost_updates"] = max(max(0, e["last_acked_version"] - e["found_version"]) for e in found) \
                if found else None
            lost_total += entry["lost_updates"] or 0
        kills.append(entry)
    return kills, lost_total


def _cost(events: list[dict], rates: CostRates, reached_s: float | None, trained_s: float | None) -> dict[str, Any]:
    """The run's price (:mod:`stalwart.metrics.cost`), and the part of it spent until the
    target accuracy was reached (at ``reached_s`` of ``trained_s`` seconds of training):
    the price pro rata of the training time it took."""
    priced = price(events, rates)
    priced["cost_to_target_usd"] = priced["cost_usd"] * reached_s / trained_s \
        if priced["cost_usd"] is not None and reached_s is not None and trained_s else None
    return priced


def _bytes_by_path(workers: list[dict]) -> dict[str, int]:
    """Payload bytes the workers pushed and pulled, by path: shared memory, TCP's socket,
    LTP's UDP. Payloads only: headers, the evaluator's pulls and a chain's forwarding
    between servers are not in it."""
    total = {"shm": 0, "tcp": 0, "ltp": 0}
    for w in workers:
        for path, n in (w.get("bytes_by_path") or {}).items():
            total[path] = total.get(path, 0) + n
    return total


def _rounds(servers: dict[int, dict]) -> dict[str, Any]:
    """Time between updates (under BSP: one synchronization round) and, for LTP, the lost
    fraction of the pushes; from the slowest shard, which sets the pace."""
    timed = [s for s in servers.values() if s.get("update_ms_mean")]
    slowest = max(timed, key=lambda s: s["update_ms_mean"], default={})
    ltp = [s for s in servers.values() if s.get("ltp_rounds")]
    rounds = sum(s["ltp_rounds"] for s in ltp)
    return {
        "round_ms_p50": slowest.get("update_ms_p50"),
        "round_ms_p99": slowest.get("update_ms_p99"),
        "rounds_per_s": 1000 / slowest["update_ms_mean"] if slowest else None,
        "ltp_rounds": rounds,
        "lost_fraction": sum(s["ltp_lost_mean"] * s["ltp_rounds"] for s in ltp) / rounds if rounds else 0.0,
        "lost_fraction_max": max((s["ltp_lost_max"] for s in ltp), default=0.0),
        "ltp_resends": sum(s.get("ltp_resends", 0) for s in ltp),
    }


class RunDirError(ValueError):
    """A folder that is not a run directory, or one too damaged to summarize; the
    message names the folder and what is wrong with it."""


def _read_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a run directory ({'not a folder' if run_dir.exists() else 'no such folder'})")
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not a run directory (no config.yaml)")
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        problem = getattr(exc, "problem", None) or getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise RunDirError(f"{path} is damaged{where}: {problem}") from None
    missing = [k for k in ("cluster", "sync", "data", "model", "optimizer", "train")
               if not isinstance(config, dict) or not isinstance(config.get(k), dict)]
    if missing:
        raise RunDirError(f"{path} is damaged: no {', '.join(missing)} section")
    return config


def summarize(run_dir: str | Path) -> dict[str, Any]:
    """The summary of a run directory, or :class:`RunDirError` naming what is wrong."""
    run_dir = Path(run_dir)
    config = _read_config(run_dir)
    if not any((run_dir / "events").glob("*.jsonl")):
        raise RunDirError(f"{run_dir} has no event logs (events/*.jsonl): nothing to summarize")
    try:
        rates = CostRates.model_validate(config.get("cost") or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise RunDirError(f"{run_dir}/config.yaml: cost.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    try:
        return _summarize(run_dir, config, list(read_events(run_dir)), rates)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RunDirError(f"{run_dir}: its config.yaml or event logs lack what a summary needs "
                          f"({type(exc).__name__}: {exc})") from None


def _summarize(run_dir: Path, config: dict, events: list[dict], rates: CostRates) -> dict[str, Any]:
    by = lambda name: [e for e in events if e["event"] == name]  # noqa: E731
    curve = _curve(events)
    target = config["train"].get("target_accuracy")
    time_to_target = next((p["elapsed_s"] for p in curve if target is not None and p["accuracy"] >= target), None)
    train_s = curve[-1]["elapsed_s"] if curve else None
    start = by("job_start")
    end = by("job_end")
    servers = {e["index"]: e for e in by("server_stop")}
    if not servers:  # a server that died has no stop event; take its last stats
        servers = {e["index"]: e for e in by("server_stats")}
    workers = by("worker_stop")
    pushes = sum(s.get("pushes", 0) for s in servers.values())
    # A worker held at a gate waits on every shard at once: its wait is the longest.
    waits = [s.get("wait_s") or [] for s in servers.values()]
    # Every worker that ran: the job's own, and workers that joined it (servers have room for more).
    ran = {e["index"] for e in events if e["event"] == "worker_start"} | set(range(config["cluster"]["workers"]))
    wait_per_worker = [max(w[i] for w in waits if len(w) > i) for i in range(min(max(ran) + 1, max(map(len, waits), default=0)))]
    # With chains every replica of the leading shard logs the same barrier: count each once.
    barriers = list({b["barrier"]: b for b in reversed(by("barrier"))}.values())
    recovery = config.get("recovery", {})
    kills, lost_updates = _kills(events, recovery.get("replicas", 1) if recovery.get("strategy") == "chain" else 1)
    for kill in kills:
        kill.update(_accuracy_around(curve, kill))
    staleness = sum(s.get("staleness_sum", 0) for s in servers.values())
    resources = _resources(events)
    return {
        "run_dir": str(run_dir),
        "workers": len(ran),
        "servers": config["cluster"]["servers"],
        "sync": config["sync"]["policy"],
        # A script brings its own data and model, which the configuration does not name.
        "dataset": None if config.get("command") else config["data"]["dataset"],
        "model": None if config.get("command") else config["model"]["name"],
        "optimizer": config["optimizer"]["name"],
        "transport": config["cluster"].get("transport", "tcp"),
        "final_accuracy": curve[-1]["accuracy"] if curve else None,
        "best_accuracy": max((p["accuracy"] for p in curve), default=None),
        "final_loss": curve[-1]["loss"] if curve else None,
        "target_accuracy": target,
        "time_to_target_s": time_to_target,
        "wall_s": (end[-1]["t"] - start[0]["t"]) if start and end else None,
        "train_s": train_s,
        "updates_applied": min((s.get("version", 0) for s in servers.values()), default=0),
        "updates_per_s": (min(s.get("version", 0) for s in servers.values()) / curve[-1]["elapsed_s"]
                          if servers and curve and curve[-1]["elapsed_s"] > 0 else None),
        "worker_iterations": sum(w.get("iterations", 0) for w in workers),
        "bytes_pushed": sum(w.get("bytes_pushed", 0) for w in workers),
        "bytes_pulled": sum(w.get("bytes_pulled", 0) for w in workers),
        "bytes_by_path": _bytes_by_path(workers),
        "mean_staleness": staleness / pushes if pushes else None,
        "rejected_frames": sum(s.get("rejected", 0) for s in servers.values()),
        "worker_compute_s": sum(w.get("compute_s", 0.0) for w in workers),
        "worker_comm_s": sum(w.get("comm_s", 0.0) for w in workers),
        "stragglers": config.get("faults", {}).get("stragglers", []),
        "iterations_per_worker": [w.get("iterations", 0) for w in sorted(workers, key=lambda e: e["index"])],
        "straggler_delay_s": sum(w.get("delay_s", 0.0) for w in workers),
        "wait_s_per_worker": wait_per_worker,
        "time_split_per_worker": _time_split(workers, wait_per_worker),
        "barriers": len(barriers),
        "recovery": recovery.get("strategy", "none") + (f"/{recovery.get('mode')}" if recovery.get("strategy") == "chain" else ""),
        "kills": kills,
        "lost_updates": lost_updates,
        **_stateless(events),
        **resources,
        **_evaluator(events, resources["cpu_s"]),
        **_cost(events, rates, time_to_target, train_s),
        **_rounds(servers),
        **_barrier_accuracy(barriers),
        "command": config.get("command") or [],
        # workers that came into a job already training (joined it, or restarted): how soon
        # each trained, from reaching for the servers to its first step in the barrier
        "joined": [{"index": e["index"], "clock": e["clock"], "training_after_s": e["after_connect_s"]}
                   for e in by("first_step") if e["clock"] > 1],
        "script_metrics": _last_metrics(events),
        "curve": curve,
        "local_curve": _local_curve(events),
    }


def _on_record(run_dir: Path) -> tuple[dict, bool]:
    """The status and error of the summary already written, and whether it was damaged."""
    try:
        previous = json.loads((run_dir / "summary.json").read_text())
    except FileNotFoundError:
        return {"status": "unknown", "error": None}, False
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {"status": "unknown", "error": None}, True
    if not isinstance(previous, dict):
        return {"status": "unknown", "error": None}, True
    return {"status": previous.get("status", "completed"), "error": previous.get("error")}, False


def write_summary(run_dir: str | Path, status: str | None = "completed", error: str | None = None) -> dict:
    """Summarize ``run_dir`` into its ``summary.json`` and ``accuracy.png``. With
    ``status=None`` the status on record is kept (``report``); a damaged summary.json
    is rebuilt, and the result says so (``rebuilt_from_damaged``)."""
    from .plots import plot_runs
    run_dir = Path(run_dir)
    damaged = False
    if status is None:
        record, damaged = _on_record(run_dir)
        status, error = record["status"], record["error"]
    summary = {"status": status, "error": error, **summarize(run_dir)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if summary["curve"]:
        plot_runs([summary], run_dir / "accuracy.png")
    return {**summary, "rebuilt_from_damaged": True} if damaged else summary
