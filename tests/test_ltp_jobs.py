"""LTP in real jobs: training with packets dropped on purpose, and the incast bottleneck of netlab."""

import subprocess

import pytest

from stalwart.config import JobConfig
from stalwart.launch import Job
from stalwart.netlab import NetLab, unavailable_reason

from helpers import events

pytestmark = pytest.mark.integration


def test_training_over_ltp_with_dropped_packets_still_learns(run_root):
    config = JobConfig.validate_dict({
        "cluster": {"workers": 2, "servers": 2, "transport": "ltp"}, "sync": {"policy": "bsp"},
        "ltp": {"drop": 0.05, "drop_seed": 7},
        "train": {"duration_s": 8, "target_accuracy": 0.5, "eval_interval_s": 0.5},
        "out": str(run_root), "progress": False})
    summary = Job(config).run()
    assert summary["status"] == "completed"
    assert summary["final_accuracy"] > 0.5, summary  # chance is 0.1
    rounds = events(run_root / next(run_root.iterdir()).name, "ltp_round")
    assert len(rounds) > 50
    assert any(r["lost"] > 0 for r in rounds)  # loss happened, and was tolerated
    assert max(r["lost"] for r in rounds) <= 0.1 + 1e-9  # never past the ceiling
    assert summary["transport"] == "ltp" and 0 < summary["lost_fraction"] <= 0.1
    paths = summary["bytes_by_path"]  # pushes over UDP, pulls over the TCP stream (LTP never uses shm)
    assert paths["ltp"] >= summary["bytes_pushed"] and paths["tcp"] >= summary["bytes_pulled"] and paths["shm"] == 0


needs_lab = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


@needs_lab
def test_a_lab_always_tears_down_what_it_built():
    with pytest.raises(RuntimeError, match="inside the lab"):
        with NetLab(workers=2, servers=1, rate_mbit=50, buffer_kb=16) as lab:
            names = [h.netns for h in lab.hosts]
            assert set(names) <= set(subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                    text=True).stdout.split())
            raise RuntimeError("a failure inside the lab")
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in left for n in names)
    assert lab.bridge not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


@needs_lab
def test_incast_through_the_bottleneck_tcp_loses_packets_and_ltp_finishes_its_rounds(tmp_path):
    def job(transport: str) -> tuple[dict, dict]:
        config = JobConfig.validate_dict({
            "cluster": {"workers": 4, "servers": 1, "transport": transport}, "sync": {"policy": "bsp"},
            "model": {"name": "mlp", "hidden": 256},
            "train": {"duration_s": 5, "target_accuracy": None, "eval_interval_s": 1.0},
            "out": str(tmp_path / transport), "progress": False})
        with NetLab(workers=4, servers=1, rate_mbit=100, buffer_kb=16) as lab:
            config.cluster.host = lab.bridge_address
            summary = Job(config, placement=lab.placement()).run()
            return summary, lab.bottleneck_stats()

    tcp, tcp_queue = job("tcp")
    assert tcp["status"] == "completed" and tcp["updates_applied"] > 0
    assert tcp_queue["dropped"] > 0  # incast: four pushes at once overflow a 16 KB queue
    ltp, ltp_queue = job("ltp")
    assert ltp["status"] == "completed" and ltp["updates_applied"] > 0
    assert ltp["ltp_rounds"] >= 4 * ltp["updates_applied"] - 4  # every round's pushes closed
    assert ltp["lost_fraction_max"] <= 0.1 + 1e-9
