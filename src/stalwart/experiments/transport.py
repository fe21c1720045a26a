"""``stalwart experiment transport``: TCP against LTP through an incast bottleneck.

Eight workers push to one server (BSP, so every round waits for the last push) across
an emulated network (:mod:`stalwart.netlab`): the server's link is a token bucket of
``rate_mbit`` with a queue of ``buffer_kb``. Three parts:

* **grid**: each transport at each rate and buffer for ``duration_s``: time per
  synchronization round (median, 99th percentile), rounds per second, the lost
  fraction of LTP's rounds, and packets dropped at the bottleneck;
* **parity**: the same training run to a fixed number of epochs over each transport
  (TCP, LTP, LTP with the Hadamard rotation) at one rate and buffer: final accuracy and
  wall time;
* **fills**: on loopback, LTP with a seeded receiver drop (``fill_drop``) under each
  bubble-fill rule, against TCP: which rule keeps accuracy.

It writes ``results.json`` (one row per run: ``part``, ``transport``, ``rate_mbit``,
``buffer_kb``, ``round_p50_ms``, ``round_p99_ms``, ``rounds_per_s``, ``lost_fraction``,
``final_accuracy`` and more), ``results.md``, ``rounds.png`` and ``runs/``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..config import JobConfig  # noqa: E402
from ..metrics.plots import COLORS, legend_beside, line_styles  # noqa: E402
from .common import Case, markdown_table, run_cases  # noqa: E402

VARIANTS = {
    "tcp": ("tcp", {}),
    "ltp": ("ltp", {}),
    "ltp/hadamard": ("ltp", {"hadamard": True}),
    "ltp/zero": ("ltp", {"fill": "zero"}),
    "ltp/previous": ("ltp", {"fill": "previous"}),
}
FULL = {"rates": (100.0, 500.0), "buffers": (32.0, 256.0), "duration_s": 12.0, "parity_epochs": 6.0,
        "parity_rate": 500.0, "parity_buffer": 64.0, "fill_drop": 0.1, "fill_epochs": 6.0}
QUICK = {"rates": (200.0,), "buffers": (64.0,), "duration_s": 6.0, "parity_epochs": 0.0,
         "parity_rate": 200.0, "parity_buffer": 64.0, "fill_drop": 0.1, "fill_epochs": 0.0}


def base_config(workers: int = 8, hidden: int = 256, lr: float = 0.05, batch_size: int = 32) -> dict:
    """8 BSP workers, one server, an MLP of 78k parameters (312 KB per push) on MNIST-1D."""
    return {
        "cluster": {"workers": workers, "servers": 1},
        "data": {"dataset": "mnist1d", "batch_size": batch_size},
        "model": {"name": "mlp", "hidden": hidden},
        "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.9},
        "sync": {"policy": "bsp"},
        "train": {"duration_s": 12.0, "target_accuracy": None, "eval_interval_s": 1.0},
        "progress": False,
    }


def _case(part: str, variant: str, base: dict, out: Path, *, rate: float | None, buffer: float | None,
          train: dict, ltp: dict | None = None) -> Case:
    transport, settings = VARIANTS[variant]
    data = json.loads(json.dumps(base))
    data["cluster"]["transport"] = transport
    data["ltp"] = {**settings, **(ltp or {})}
    data["train"] = {**data["train"], **train}
    where = f"r{rate:g}-b{buffer:g}" if rate is not None else "loopback"
    data.update(out=str(out / "runs"), name=f"{part}-{variant.replace('/', '-')}-{where}")
    lab = None if rate is None else {"workers": data["cluster"]["workers"], "servers": 1,
                                     "rate_mbit": rate, "buffer_kb": buffer}
    return Case(f"{part}|{variant}|{rate}|{buffer}", 0, JobConfig.validate_dict(data), lab)


def plan(preset: dict, base: dict, out: Path, variants: tuple[str, ...] = ("tcp", "ltp")) -> list[Case]:
    cases = [_case("grid", v, base, out, rate=r, buffer=b, train={"duration_s": preset["duration_s"]})
             for r in preset["rates"] for b in preset["buffers"] for v in variants]
    if preset["parity_epochs"]:
        epochs = {"duration_s": None, "epochs": preset["parity_epochs"]}
        cases += [_case("parity", v, base, out, rate=preset["parity_rate"], buffer=preset["parity_buffer"],
                        train=epochs) for v in ("tcp", "ltp", "ltp/hadamard")]
    if preset["fill_epochs"]:
        epochs = {"duration_s": None, "epochs": preset["fill_epochs"]}
        cases.append(_case("fills", "tcp", base, out, rate=None, buffer=None, train=epochs))
        cases += [_case("fills", v, base, out, rate=None, buffer=None, train=epochs,
                        ltp={"drop": preset["fill_drop"], "drop_seed": 1})
                  for v in ("ltp", "ltp/zero", "ltp/previous", "ltp/hadamard")]
    return cases


def run_row(summary: dict) -> dict:
    part, variant, rate, buffer = summary["group"].split("|")
    bottleneck = summary.get("bottleneck") or {}
    return {
        "part": part, "transport": variant, "rate_mbit": None if rate == "None" else float(rate),
        "buffer_kb": None if buffer == "None" else float(buffer), "status": summary.get("status"),
        "error": summary.get("error"),
        "round_p50_ms": summary.get("round_ms_p50"), "round_p99_ms": summary.get("round_ms_p99"),
        "rounds_per_s": summary.get("rounds_per_s"), "rounds": summary.get("updates_applied"),
        "lost_fraction": summary.get("lost_fraction"), "lost_fraction_max": summary.get("lost_fraction_max"),
        "resend_requests": summary.get("ltp_resends"),
        "bottleneck_packets": bottleneck.get("sent_packets"), "bottleneck_dropped": bottleneck.get("dropped"),
        "final_accuracy": summary.get("final_accuracy"), "train_s": summary.get("train_s"),
        "cpu_s": summary.get("cpu_s"), "run_dir": summary.get("run_dir"),
    }


def _f(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_markdown(rows: list[dict], meta: dict) -> str:
    grid = [r for r in rows if r["part"] == "grid"]
    parity = [r for r in rows if r["part"] == "parity"]
    fills = [r for r in rows if r["part"] == "fills"]
    text = ["# TCP vs LTP through an incast bottleneck\n",
            f"{meta['workload']['cluster']['workers']} BSP workers -> 1 server, MLP "
            f"(hidden {meta['workload']['model']['hidden']}), MNIST-1D; wall {meta['wall_s']:.0f} s.\n"]
    if grid:
        text += ["## Rounds (grid)\n", markdown_table(grid, [
            ("transport", lambda r: r["transport"]), ("rate Mbit/s", lambda r: _f(r["rate_mbit"], 0)),
            ("buffer KB", lambda r: _f(r["buffer_kb"], 0)), ("round p50 ms", lambda r: _f(r["round_p50_ms"])),
            ("round p99 ms", lambda r: _f(r["round_p99_ms"])), ("rounds/s", lambda r: _f(r["rounds_per_s"], 2)),
            ("lost fraction", lambda r: _f(r["lost_fraction"], 4)),
            ("bottleneck drops", lambda r: "-" if r["bottleneck_dropped"] is None else
             f"{r['bottleneck_dropped']} / {r['bottleneck_packets'] + r['bottleneck_dropped']}"),
            ("accuracy", lambda r: _f(r["final_accuracy"], 3))]), ""]
    if parity:
        text += [f"## Accuracy parity ({meta['preset']['parity_epochs']:g} epochs, "
                 f"{meta['preset']['parity_rate']:g} Mbit/s, {meta['preset']['parity_buffer']:g} KB)\n",
                 markdown_table(parity, [
                     ("transport", lambda r: r["transport"]), ("final accuracy", lambda r: _f(r["final_accuracy"], 3)),
                     ("train s", lambda r: _f(r["train_s"])), ("round p50 ms", lambda r: _f(r["round_p50_ms"])),
                     ("round p99 ms", lambda r: _f(r["round_p99_ms"])),
                     ("lost fraction", lambda r: _f(r["lost_fraction"], 4))]), ""]
    if fills:
        text += [f"## Bubble filling (loopback, receiver drops {meta['preset']['fill_drop']:.0%} of packets, "
                 f"{meta['preset']['fill_epochs']:g} epochs)\n",
                 markdown_table(fills, [
                     ("transport / fill", lambda r: r["transport"] + (" (no drop)" if r["transport"] == "tcp" else "")),
                     ("final accuracy", lambda r: _f(r["final_accuracy"], 3)),
                     ("lost fraction", lambda r: _f(r["lost_fraction"], 4)),
                     ("resend requests", lambda r: str(r["resend_requests"] or 0))]), ""]
    return "\n".join(text)


def plot(rows: list[dict], summaries: list[dict], path: Path) -> None:
    grid = [r for r in rows if r["part"] == "grid" and r["round_p50_ms"] is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.5))
    settings = sorted({(r["rate_mbit"], r["buffer_kb"]) for r in grid})
    for k, name in enumerate(sorted({r["transport"] for r in grid})):
        mine = {(r["rate_mbit"], r["buffer_kb"]): r for r in grid if r["transport"] == name}
        xs = [i + 0.38 * k for i, s in enumerate(settings) if s in mine]
        p50 = [mine[s]["round_p50_ms"] for s in settings if s in mine]
        p99 = [mine[s]["round_p99_ms"] for s in settings if s in mine]
        left.bar(xs, p50, width=0.36, label=f"{name} p50", color=COLORS[k])
        left.scatter(xs, p99, marker="_", s=400, color="black", zorder=3,
                     label="p99" if k == 0 else None)
    left.set_xticks([i + 0.19 for i in range(len(settings))],
                    [f"{r:g} Mbit/s\n{b:g} KB" for r, b in settings])
    left.set_ylabel("time per BSP round (ms)")
    left.set_title("rounds through the bottleneck")
    left.legend(fontsize=8)  # bars and ticks only: the upper left corner is over the shortest bar
    runs = [s for s in summaries if s["group"].startswith(("parity", "fills")) and s.get("curve")]
    label = lambda s: s["group"].split("|")[0] + ": " + s["group"].split("|")[1]  # noqa: E731
    styles = line_styles([label(s) for s in runs])
    for s in runs:
        curve = s["curve"]
        right.plot([p["elapsed_s"] for p in curve], [p["accuracy"] for p in curve], label=label(s),
                   **styles[label(s)])
    right.set_xlabel("seconds")
    right.set_ylabel("test accuracy")
    right.set_title("training runs (parity: netlab; fills: loopback with drops)")
    legend_beside(right, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_transport_experiment(out: Path, preset: dict = FULL, base: dict | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    base = base or base_config()
    cases = plan(preset, base, out)
    started = time.time()
    summaries = run_cases(cases, out)
    rows = [run_row(s) for s in summaries]
    meta = {"workload": base, "preset": preset, "wall_s": time.time() - started}
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "results.md").write_text(render_markdown(rows, meta))
    plot(rows, summaries, out / "rounds.png")
    return {**meta, "rows": rows}
