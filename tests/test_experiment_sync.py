"""The sync experiment end to end, shrunk: two policies, one seed, a few seconds each."""

import json

import pytest

from stalwart.experiments.sync import base_config, run_sync_experiment

pytestmark = pytest.mark.integration


def test_sync_experiment_writes_plot_tables_and_runs(tmp_path):
    base = base_config(workers=2, servers=1, stragglers=("1:2.0",), duration_s=4.0, target=0.5)
    result = run_sync_experiment(tmp_path, ["bsp", "elastic:8"], seeds=1, base=base)
    assert [r["policy"] for r in result["policies"]] == ["bsp", "elastic:8"]
    for row in result["policies"]:
        assert row["completed"] == 1 and row["final_accuracy"] > 0.3
        assert len(row["wait_s_per_worker"]) == 2 and len(row["iterations_per_worker"]) == 2
    bsp, elastic = result["policies"]
    assert bsp["mean_staleness"] == 0 and bsp["barriers"] == 0
    assert elastic["barriers"] > 0 and elastic["barrier_actual_wait_s"] is not None
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["policies"] == json.loads(json.dumps(result["policies"]))
    assert {r["sync"] for r in on_disk["runs"]} == {"bsp", "elastic:8"}
    table = (tmp_path / "results.md").read_text()
    assert "| `elastic:8` | 1/1 |" in table
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["bsp-seed0", "elastic-8-seed0"]
