"""``stalwart experiment control``: the control plane's failures, measured on real jobs.

Four scenarios on the default job (MNIST-1D, 4 workers, 2 shards, BSP), each a real
SIGKILL at ``kill_at_s``:

* **coordinator restart** -- the coordinator, back ``down_s`` later (memory store):
  training through the outage, and the time until a coordinator answers again;
* **etcd takeover** -- the coordinator with the etcd store and one standby, never
  restarted: the time until the standby answers;
* **replica kill** -- the head of shard 0's strong chain (2 replicas), coordinator up:
  the time until the coordinator takes it out of the chain;
* **replica kill, coordinator down** -- the coordinator, then half a second later the
  same server while no coordinator is there: that removal waits for the restart.

Per scenario, over seeds: final accuracy, ``control_back_s`` (kill to the first rejoin a
coordinator answered), ``removed_s`` (server kill to its removal), updates applied per
second while the coordinator was down against the seconds before, and updates lost.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..config import JobConfig
from ..control.etcd_server import EtcdUnavailable, LocalEtcd
from .common import Case, markdown_table, run_cases

SCENARIOS = ("coordinator restart", "etcd takeover", "replica kill", "replica kill, coordinator down")


def scenario_config(name: str, base: dict, kill_at_s: float, down_s: float, etcd: str | None) -> dict:
    at, after = f"{kill_at_s:g}s", f"{kill_at_s + 0.5:g}s"
    chain = {"strategy": "chain", "replicas": 2, "mode": "strong"}
    return {
        "coordinator restart": {**base, "faults": {"kills": [f"coordinator:0@{at},down={down_s:g}s"]}},
        "etcd takeover": {**base, "control": {"store": etcd or "etcd://127.0.0.1:2379"},
                          "faults": {"kills": [f"coordinator:0@{at}"]}},
        "replica kill": {**base, "recovery": chain, "faults": {"kills": [f"head:0@{at}"], "down_s": down_s}},
        "replica kill, coordinator down": {**base, "recovery": chain, "faults": {
            "kills": [f"coordinator:0@{at},down={down_s:g}s", f"server:0@{after}"], "down_s": down_s}},
    }[name]


def _rate(curve: list[dict], start: float, end: float) -> float | None:
    """Updates applied per second between two times, from the evaluations inside them."""
    inside = [p for p in curve if start <= p["elapsed_s"] <= end and p.get("version") is not None]
    if len(inside) < 2 or inside[-1]["elapsed_s"] <= inside[0]["elapsed_s"]:
        return None
    return (inside[-1]["version"] - inside[0]["version"]) / (inside[-1]["elapsed_s"] - inside[0]["elapsed_s"])


def measures(summary: dict) -> dict:
    kills = summary.get("kills") or []
    coordinator = next((k for k in kills if k["role"] == "coordinator"), None)
    server = next((k for k in kills if k["role"] == "server"), None)
    row = {"final_accuracy": summary.get("final_accuracy"), "status": summary.get("status"),
           "control_back_s": coordinator.get("control_back_s") if coordinator else None,
           "removed_s": server.get("removed_s") if server else None,
           "lost_updates": summary.get("lost_updates") if server else None}
    if coordinator and coordinator.get("control_back_s") is not None:
        at, back = coordinator["at_s"], coordinator["at_s"] + coordinator["control_back_s"]
        row["rate_before"] = _rate(summary.get("curve", []), at - 4.0, at)
        row["rate_during"] = _rate(summary.get("curve", []), at, back)
    return row


def _median(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def _range(values: list) -> tuple[float, float] | None:
    kept = [v for v in values if v is not None]
    return (min(kept), max(kept)) if kept else None


def run_control_experiment(out: Path, base: dict, seeds: int, kill_at_s: float, down_s: float,
                           scenarios: tuple[str, ...] = SCENARIOS) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    etcd, skipped = None, {}
    if "etcd takeover" in scenarios:
        try:
            etcd = LocalEtcd().start()
        except EtcdUnavailable as exc:
            skipped["etcd takeover"] = str(exc)
            scenarios = tuple(s for s in scenarios if s != "etcd takeover")
    try:
        cases = []
        for name in scenarios:
            for seed in range(seeds):
                data = scenario_config(name, base, kill_at_s, down_s, etcd.endpoint if etcd else None)
                data = {**data, "train": {**data.get("train", {}), "seed": seed},
                        "out": str(out / "runs"), "name": f"{name.replace(' ', '-').replace(',', '')}-{seed}",
                        "progress": False}
                cases.append(Case(name, seed, JobConfig.validate_dict(data)))
        summaries = run_cases(cases, out)
    finally:
        if etcd is not None:
            etcd.stop()
    result = aggregate(summaries, scenarios, seeds, kill_at_s, down_s, skipped)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(render_markdown(result))
    return result


def aggregate(summaries: list[dict], scenarios: tuple[str, ...], seeds: int, kill_at_s: float, down_s: float,
              skipped: dict) -> dict:
    """Median and range per scenario of what :func:`measures` reads from each run."""
    rows = []
    for name in scenarios:
        got = [measures(s) for s in summaries if s["group"] == name]
        row = {"scenario": name, "runs": len(got), "completed": sum(g["status"] == "completed" for g in got)}
        for key in ("final_accuracy", "control_back_s", "removed_s", "rate_before", "rate_during", "lost_updates"):
            row[key] = _median([g.get(key) for g in got])
            row[f"{key}_range"] = _range([g.get(key) for g in got])
        rows.append(row)
    return {"rows": rows, "skipped": skipped, "seeds": seeds, "kill_at_s": kill_at_s, "down_s": down_s}


def render_markdown(result: dict) -> str:
    def fmt(key: str, digits: int = 2):
        def cell(row: dict) -> str:
            value, span = row.get(key), row.get(f"{key}_range")
            if value is None:
                return "-"
            text = f"{value:.{digits}f}"
            return text + (f" ({span[0]:.{digits}f}-{span[1]:.{digits}f})" if span and span[0] != span[1] else "")
        return cell

    text = markdown_table(result["rows"], [
        ("scenario", lambda r: r["scenario"]), ("completed", lambda r: f"{r['completed']}/{r['runs']}"),
        ("final accuracy", fmt("final_accuracy", 3)), ("control back s", fmt("control_back_s")),
        ("removed from chain s", fmt("removed_s")), ("updates/s before", fmt("rate_before", 0)),
        ("updates/s coordinator down", fmt("rate_during", 0)), ("lost updates", fmt("lost_updates", 0))])
    text += (f"\nMedian (range) over {result['seeds']} seeds; kill at {result['kill_at_s']:g} s, "
             f"a restarted role back {result['down_s']:g} s later.\n")
    for name, why in result["skipped"].items():
        text += f"\n{name}: skipped ({why})\n"
    return text
