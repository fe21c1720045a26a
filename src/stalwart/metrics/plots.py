"""Plots: test accuracy and loss against wall time, one or many runs on one figure.

Every plot here and in the experiments draws its lines through :func:`line_styles`,
so that no two lines of one figure share a colour and a dash (ten colours, then the
dashes change), and puts its legend beside the axes with :func:`legend_beside`, where
it cannot cover a curve. Kills, outages and restarts are drawn by :func:`mark_kill`
and :func:`mark_outage`, each with a label on the plot.
"""

from __future__ import annotations

from itertools import product
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = [f"tab:{c}" for c in ("blue", "orange", "green", "purple", "brown", "pink", "gray", "olive", "cyan", "red")]
DASHES = ["-", "--", "-.", ":"]
MAX_STYLES = len(COLORS) * len(DASHES)  # lines one figure can keep apart
KILL_COLOR = "crimson"   # kills are marked in a colour of their own, not one from the cycle


def line_styles(names: list[str]) -> dict[str, dict]:
    """A distinct (colour, dash) per name, in order: ``ax.plot(..., **styles[name])``."""
    pairs = product(DASHES, COLORS)
    styles = {}
    for name in dict.fromkeys(names):
        try:
            dash, color = next(pairs)
        except StopIteration:
            raise ValueError(f"{len(set(names))} lines are more than {MAX_STYLES} styles") from None
        styles[name] = {"color": color, "ls": dash}
    return styles


def legend_beside(ax, fontsize: float = 7, **kwargs) -> None:
    """The legend to the right of the axes (never over the data), when there is one."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, **kwargs)


def mark_outage(ax, at_s: float, until_s: float | None, label: str, restarted_s: float | None = None) -> None:
    """A dashed line at a kill labelled ``label``, the outage shaded until ``until_s``
    (when updates were applied again), and a dotted line at the restart, labelled too."""
    ax.axvline(at_s, color=KILL_COLOR, ls="--", lw=1)
    if until_s is not None and until_s > at_s:
        ax.axvspan(at_s, until_s, color=KILL_COLOR, alpha=0.08, lw=0)
    ax.annotate(label, (at_s, 0.02), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                color=KILL_COLOR, xytext=(2, 0), textcoords="offset points")
    if restarted_s is not None:
        ax.axvline(restarted_s, color="darkgreen", ls=":", lw=1)
        ax.annotate("restart", (restarted_s, 0.02), xycoords=("data", "axes fraction"), rotation=90,
                    fontsize=7, color="darkgreen", xytext=(2, 0), textcoords="offset points")


def mark_kill(ax, kill: dict) -> None:
    """One kill of a run's summary: the role it hit, its outage and its restart."""
    what = f"{kill['role']} {kill['index']}"
    if (kill.get("rule") or "").split(":")[0] in ("head", "middle", "tail"):
        what = f"{kill['rule'].split('@')[0]} (server {kill['index']})"
    until = kill["at_s"] + kill["recovered_s"] if kill.get("recovered_s") is not None else None
    mark_outage(ax, kill["at_s"], until, f"kill {what}", kill.get("restarted_at_s"))


def label_of(summary: dict) -> str:
    return (f"{summary['sync']} w{summary['workers']} s{summary['servers']}"
            f" ({Path(summary['run_dir']).name})")


def with_gaps(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """The curve with a break (NaN) wherever evaluations stopped for more than 2.5 of
    their usual intervals: a time the model could not be read is a gap, not a line."""
    steps = sorted(b - a for a, b in zip(xs, xs[1:]))
    if not steps:
        return xs, ys
    limit = 2.5 * steps[len(steps) // 2]
    gx, gy = xs[:1], ys[:1]
    for (a, b), y in zip(zip(xs, xs[1:]), ys[1:]):
        if b - a > limit:
            gx.append((a + b) / 2)
            gy.append(float("nan"))
        gx.append(b)
        gy.append(y)
    return gx, gy


def plot_runs(summaries: list[dict], out: Path) -> Path:
    many = len(summaries) > 1
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12 if many else 11, 4.2))
    styles = line_styles([label_of(s) for s in summaries])
    for s in summaries:
        xs = [p["elapsed_s"] for p in s["curve"]]
        label = label_of(s)
        ax_acc.plot(*with_gaps(xs, [p["accuracy"] for p in s["curve"]]), label=label if many else None,
                    **styles[label])
        ax_loss.plot(*with_gaps(xs, [p["loss"] for p in s["curve"]]), label=label if many else None,
                     **styles[label])
        if s.get("local_curve") and not many:  # through the outage: worker 0's own copy
            local = s["local_curve"]
            ax_acc.plot([p["elapsed_s"] for p in local], [p["accuracy"] for p in local], ls=":", marker=".",
                        color=styles[label]["color"], label="worker 0's local copy (server down)")
            ax_acc.legend(fontsize=7, loc="upper left")  # early on the curve is low: that corner is free
        if s.get("target_accuracy") is not None and not many:
            ax_acc.axhline(s["target_accuracy"], color="grey", ls=":", lw=1)
        for k in s.get("kills", []) if not many else []:
            mark_kill(ax_acc, k)
    ax_acc.set(xlabel="wall time since training started (s)", ylabel="test accuracy", ylim=(0, 1))
    ax_loss.set(xlabel="wall time since training started (s)", ylabel="test loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    if many:
        legend_beside(ax_loss)
    else:
        fig.suptitle(label_of(summaries[0]))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
