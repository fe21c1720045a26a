"""The sync experiment end to end, shrunk: two policies, one seed, a few seconds each."""

import json

import pytest

from stalwart.experiments.sync import PRESETS, base_config, patterns, run_sync_experiment
from stalwart.faults import Straggler, parse_straggler

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
    for plot in ("accuracy.png", "time_to_bsp.png", "time_split.png"):
        assert (tmp_path / plot).stat().st_size > 10_000
    # Each worker's time split adds up to about the run's length, and the straggler's
    # delay lands on the straggler alone; under BSP the fast worker waits for it.
    split = bsp["time_split_per_worker"]
    for w in split:
        assert 3.0 < sum(w.values()) < 8.0
    assert split[0]["straggler_s"] == 0 and split[1]["straggler_s"] > 0.5
    assert split[0]["wait_s"] > split[1]["wait_s"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["bsp-seed0", "elastic-8-seed0"]


@pytest.mark.parametrize("name", ["straggler", "jitter", "shift"])
def test_every_straggler_pattern_parses_and_the_shift_changes_speed_halfway(name):
    rules = [parse_straggler(r) for r in patterns(120.0)[name]]
    assert rules
    if name == "shift":
        before = [Straggler(rules, w).delay(0.1, clock=10, elapsed_s=30.0)[0] for w in range(4)]
        after = [Straggler(rules, w).delay(0.1, clock=10, elapsed_s=90.0)[0] for w in range(4)]
        assert before == pytest.approx([0, 0, 0, 0.1]) and after == pytest.approx([0.1, 0, 0, 0])


def test_presets_name_runnable_jobs():
    from stalwart.config import JobConfig
    for preset in PRESETS.values():
        for quick in (preset, preset.with_quick()):
            base = base_config(4, 2, patterns(quick.duration_s)[quick.patterns[0]], quick.duration_s, quick.target,
                               quick.batch_size, quick.dataset, quick.model, quick.lr, quick.data_dir)
            assert JobConfig.validate_dict(base).train.duration_s == quick.duration_s
    assert PRESETS["paper"].with_quick().seeds == 1 and PRESETS["paper"].seeds >= 3
