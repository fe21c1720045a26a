"""Plots read at a glance: no two lines of one axes share a colour and a dash, the
legend sits beside the data, kills and outages carry labels."""

from __future__ import annotations

import matplotlib.figure
import pytest

from stalwart.experiments import failure, sync
import math

from stalwart.metrics.plots import line_styles, plot_runs, with_gaps


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save, kept open for inspection."""
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    return saved


def _curve(level: float) -> list[dict]:
    return [{"elapsed_s": t / 2, "accuracy": min(1.0, level * t / 20), "loss": 1.0 / (1 + t), "version": t}
            for t in range(21)]


def _data_lines(ax) -> list:
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def _assert_readable(ax) -> None:
    styles = [(line.get_color(), line.get_linestyle()) for line in _data_lines(ax)]
    assert len(styles) == len(set(styles)), styles
    legend = ax.get_legend()
    if legend is not None:  # beside the axes: its anchor is right of the plotting area
        assert legend.get_bbox_to_anchor().x0 >= ax.get_window_extent().x1 - 1


def test_line_styles_distinct_for_forty_names_and_refused_beyond():
    styles = line_styles([f"run{i}" for i in range(40)])
    assert len({(s["color"], s["ls"]) for s in styles.values()}) == 40
    with pytest.raises(ValueError, match="more than 40 styles"):
        line_styles([f"run{i}" for i in range(41)])


def test_failure_plot_gives_eight_strategies_eight_styles_and_labels_each_kill(figures, tmp_path):
    strategies = failure.STRATEGIES + failure.FLUSH_VARIANTS
    grid = [(s, 1) for s in strategies]
    summaries = [{"group": f"{s}|1", "curve": _curve(0.5 + i / 20)} for i, s in enumerate(strategies)]
    base = failure.base_config(duration_s=10.0)
    failure.plot(summaries, grid, base, (3.0,), 2.0, tmp_path / "a.png")
    (ax,) = figures[0].axes
    assert len(_data_lines(ax)) == len(strategies)
    _assert_readable(ax)
    assert ax.get_legend() is not None
    assert any(t.get_text() == "kill 1: down 2 s" for t in ax.texts)


def test_sync_plot_styles_every_policy_apart(figures, tmp_path):
    policies = sync.POLICIES
    summaries = [{"group": p, "curve": _curve(0.6 + i / 10)} for i, p in enumerate(policies)]
    base = sync.base_config(4, 2, ("3:2.0",), 10.0, 0.9, 64, "mnist1d", "cnn1d")
    sync.plot(summaries, policies, base, tmp_path / "s.png")
    (ax,) = figures[0].axes
    assert len(_data_lines(ax)) == len(policies)
    _assert_readable(ax)


def test_overlay_of_twelve_runs_and_a_single_run_with_its_kill_labelled(figures, tmp_path):
    runs = [{"run_dir": f"/runs/r{i}", "sync": "asp", "workers": 4, "servers": 2, "curve": _curve(0.9),
             "kills": []} for i in range(12)]
    plot_runs(runs, tmp_path / "o.png")
    for ax in figures[0].axes:
        assert len(_data_lines(ax)) == 12
        _assert_readable(ax)
    one = dict(runs[0], target_accuracy=0.9, kills=[{"role": "server", "index": 0, "at_s": 3.0, "rule": "server:0@3s",
                                                      "recovered_s": 1.5, "restarted_at_s": 4.0}])
    plot_runs([one], tmp_path / "one.png")
    texts = {t.get_text() for t in figures[1].axes[0].texts}
    assert {"kill server 0", "restart"} <= texts


def test_a_time_without_evaluations_is_a_gap_in_the_line():
    xs, ys = with_gaps([0.0, 1.0, 2.0, 9.0, 10.0], [0.1, 0.2, 0.3, 0.8, 0.9])
    assert xs == [0.0, 1.0, 2.0, 5.5, 9.0, 10.0]
    assert math.isnan(ys[3]) and ys[:3] == [0.1, 0.2, 0.3] and ys[4:] == [0.8, 0.9]
    assert with_gaps([0.0, 1.0, 2.0], [0.1, 0.2, 0.3]) == ([0.0, 1.0, 2.0], [0.1, 0.2, 0.3])
