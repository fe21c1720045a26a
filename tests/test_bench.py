"""The benchmarks measure what they say: real processes move real bytes; tables add up."""

import json

import pytest

from stalwart.bench.anchors import render_markdown, run_anchors
from stalwart.bench.scaling import plot, run_scaling

pytestmark = pytest.mark.integration


def test_anchors_measure_stalwart_and_the_rpc_anchor_in_one_run():
    result = run_anchors([200_000], [1], seconds=0.5, systems=("stalwart/tcp", "stalwart/shm", "torch-rpc"))
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"stalwart/tcp", "stalwart/shm", "torch-rpc", "raw-tcp", "memcpy"}
    for name in ("stalwart/tcp", "stalwart/shm", "torch-rpc"):
        assert rows[name]["round_trips"] > 0 and rows[name]["mb_per_s"] > 0, rows[name]
        # MB/s is parameter bytes both ways: 2 x 4 bytes x params per round trip
        expected = rows[name]["round_trips"] * 2 * 4 * 200_000 / rows[name]["seconds"] / 1e6
        assert rows[name]["mb_per_s"] == pytest.approx(expected, rel=0.05)
    assert result["limits"]["raw-tcp"] > 0 and result["limits"]["memcpy"] > 0
    json.dumps(result)  # --json prints it as it is
    table = render_markdown(result)
    line = next(ln for ln in table.splitlines() if ln.startswith("| 0.2M"))
    best = max(rows["stalwart/tcp"]["mb_per_s"], rows["stalwart/shm"]["mb_per_s"])
    assert f"| {best / rows['torch-rpc']['mb_per_s']:.2f} |" in line


def test_render_names_a_missing_system_and_a_skipped_one():
    rows = [{"system": "stalwart/tcp", "params": 10**6, "workers": 4, "mb_per_s": 300.0},
            {"system": "raw-tcp", "params": 10**6, "workers": 4, "mb_per_s": 1000.0, "limit": True},
            {"system": "memcpy", "params": 10**6, "workers": 4, "mb_per_s": 5000.0, "limit": True}]
    table = render_markdown({"seconds": 3, "rows": rows, "skipped": {"ray-actor": "Ray is not installed"}})
    assert "| 1M | 4 | 300 | 1000 | 5000 | - | - | 0.30 | - | - |" in table
    assert "ray-actor: skipped (Ray is not installed)" in table


def test_scaling_sweeps_workers_servers_and_sizes(tmp_path):
    result = run_scaling(100_000, [1, 2], [1, 2], [200_000], "shm", seconds=0.3)
    grid = [r for r in result["rows"] if r["sweep"] == "grid"]
    sizes = [r for r in result["rows"] if r["sweep"] == "size"]
    assert {(r["workers"], r["servers"]) for r in grid} == {(1, 1), (2, 1), (1, 2), (2, 2)}
    assert [(r["params"], r["workers"], r["servers"]) for r in sizes] == [(200_000, 1, 1)]
    assert all(r["mb_per_s"] > 0 and r["round_trips"] > 0 for r in result["rows"])
    plot(result, tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").stat().st_size > 10_000


def test_training_bench_runs_stalwart_ddp_and_a_single_process_on_the_same_work(tmp_path):
    from stalwart.bench.training import render_markdown as training_table
    from stalwart.bench.training import run_training
    result = run_training(["demo"], ["stalwart/bsp", "stalwart/bsp/no-overlap", "ddp-gloo", "single"], workers=2,
                          servers=1, duration_s=3.0, every_s=1.0, target=0.5, out=tmp_path)
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"stalwart/bsp", "stalwart/bsp/no-overlap", "ddp-gloo", "single"}
    assert rows["stalwart/bsp"]["overlap"] and not rows["stalwart/bsp/no-overlap"]["overlap"]
    for system in ("stalwart/bsp", "stalwart/bsp/no-overlap"):
        assert rows[system]["compute_ms"] > 0 and rows[system]["exposed_comm_ms"] > 0
    for system, row in rows.items():
        assert "error" not in row, row
        assert row["rounds_per_s"] > 1 and row["cpu_s_per_round"] > 0, row
        assert row["samples_per_s"] == pytest.approx(row["rounds_per_s"] * row["workers"] * 32)
        assert 0.0 < row["final_accuracy"] <= 1.0
    assert rows["single"]["workers"] == 1 and rows["ddp-gloo"]["workers"] == 2
    table = training_table(result)
    assert table.count("| demo |") == 4 and "ddp-gloo" in table


def test_training_bench_systems_parse_and_a_bad_one_is_named():
    from stalwart.bench.training import parse_system
    assert parse_system("stalwart/ssp:3/no-overlap") == ("stalwart", "ssp:3", False)
    assert parse_system("stalwart/bsp") == ("stalwart", "bsp", True)
    assert parse_system("ddp-gloo") == ("ddp-gloo", None, False)
    with pytest.raises(ValueError, match="unknown system 'horovod'"):
        parse_system("horovod")
    with pytest.raises(ValueError):
        parse_system("stalwart/nonsense")


def test_fashion_mnist_names_the_debian_package_when_its_files_are_missing(tmp_path):
    from stalwart.bench import training
    from stalwart.data.datasets import fashion_mnist_missing
    why = fashion_mnist_missing(tmp_path)
    assert "dataset-fashion-mnist" in why and str(tmp_path) in why
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")  # present (read later, with its own checks)
    assert fashion_mnist_missing(tmp_path) is None
    assert training.workload_missing("demo") is None
