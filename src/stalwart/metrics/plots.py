"""Plots: test accuracy and loss against wall time, one or many runs on one figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def label_of(summary: dict) -> str:
    return (f"{summary['sync']} w{summary['workers']} s{summary['servers']}"
            f" ({Path(summary['run_dir']).name})")


def mark_kill(ax, kill: dict) -> None:
    """A red line at the kill, a green one at the restart, the outage shaded until
    updates were applied again, and a label naming the role."""
    ax.axvline(kill["at_s"], color="tab:red", ls="--", lw=1)
    if kill.get("recovered_s") is not None:
        ax.axvspan(kill["at_s"], kill["at_s"] + kill["recovered_s"], color="tab:red", alpha=0.08, lw=0)
    what = f"{kill['role']} {kill['index']}"
    if kill.get("rule", "").split(":")[0] in ("head", "middle", "tail"):
        what = f"{kill['rule'].split('@')[0]} (server {kill['index']})"
    ax.annotate(f"kill {what}", (kill["at_s"], 0.02), rotation=90, fontsize=7,
                color="tab:red", xytext=(2, 0), textcoords="offset points")
    if kill.get("restarted_at_s") is not None:
        ax.axvline(kill["restarted_at_s"], color="tab:green", ls=":", lw=1)


def plot_runs(summaries: list[dict], out: Path) -> Path:
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in summaries:
        xs = [p["elapsed_s"] for p in s["curve"]]
        label = label_of(s) if len(summaries) > 1 else None
        ax_acc.plot(xs, [p["accuracy"] for p in s["curve"]], label=label)
        ax_loss.plot(xs, [p["loss"] for p in s["curve"]], label=label)
        if s.get("target_accuracy") is not None and len(summaries) == 1:
            ax_acc.axhline(s["target_accuracy"], color="grey", ls=":", lw=1)
        for k in s.get("kills", []) if len(summaries) == 1 else []:
            mark_kill(ax_acc, k)
    ax_acc.set(xlabel="wall time since training started (s)", ylabel="test accuracy", ylim=(0, 1))
    ax_loss.set(xlabel="wall time since training started (s)", ylabel="test loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    if len(summaries) > 1:
        ax_acc.legend(fontsize=7)
    else:
        fig.suptitle(label_of(summaries[0]))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
