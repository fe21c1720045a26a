"""The failure experiment end to end, shrunk: two strategies, one kill, one seed."""

import json

import pytest

from stalwart.experiments.failure import base_config, kill_rules, recovery_section, run_failure_experiment


def test_strategy_names_map_to_recovery_configs_and_kill_rules():
    assert recovery_section("chain/relaxed") == {"strategy": "chain", "replicas": 2, "mode": "relaxed",
                                                 "every_updates": 100}
    assert recovery_section("stateless/clip") == {"strategy": "stateless", "flush_rule": "clip"}
    assert kill_rules("chain/strong", 2, (5.0, 15.0)) == ["head:0@5s", "head:0@15s"]
    assert kill_rules("checkpoint", 1, (5.0, 15.0)) == ["server:0@5s"]
    with pytest.raises(ValueError, match="unknown strategy 'raid'"):
        recovery_section("raid")
    with pytest.raises(ValueError, match="2 kills need 2 kill times"):
        kill_rules("stateless", 2, (5.0,))


@pytest.mark.integration
def test_failure_experiment_writes_rows_table_and_plot(tmp_path):
    base = base_config(workers=2, servers=1, duration_s=6.0, target=0.5)
    result = run_failure_experiment(tmp_path, ["none", "stateless"], kill_counts=(1,), seeds=1, base=base,
                                    kill_at_s=(2.0,), down_s=1.5)
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["recovery"], r["kills"], r["seed"]) for r in rows] == [("none", 1, 0), ("stateless", 1, 0)]
    required = {"recovery", "kills", "seed", "final_accuracy", "time_to_target_s", "recovered_s",
                "compute_while_down_s"}
    assert all(required <= set(r) for r in rows)
    none, stateless = rows
    assert none["status"] == "failed" and "recovery is 'none'" in none["error"]
    assert none["recovered_s"] is None and none["compute_while_down_s"] == 0
    assert stateless["status"] == "completed" and stateless["recovered_s"] > 1.5
    assert stateless["compute_while_down_s"] > 0.5 and stateless["flushed_steps"] > 0
    assert stateless["cpu_s"] > 0 and stateless["sum_rss_mb"] > 50
    assert stateless["cost_usd"] > stateless["cpu_s"] / 3600 * 0.04048  # CPU at the default rate, plus memory
    table = json.loads((tmp_path / "table.json").read_text())
    assert [(r["recovery"], r["completed"]) for r in table["rows"]] == [("none", 0), ("stateless", 1)]
    assert result["rows"] == table["rows"]
    assert "| `stateless` | 1 | 1/1 |" in (tmp_path / "results.md").read_text()
    assert "cost (m$)" in (tmp_path / "results.md").read_text() and table["rows"][1]["cost_usd"] > 0
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
