"""The Ray launcher: unchanged jobs, their roles as Ray actors on a Ray cluster the test
starts on this machine (two Ray nodes, so placement across nodes is real), with real
SIGKILLs of the roles' processes."""

import pytest

from stalwart.config import JobConfig
from stalwart.launch import Job, JobFailed

from helpers import events

ray = pytest.importorskip("ray", reason="the Ray launcher needs the optional extra stalwart[ray]")
from ray.cluster_utils import Cluster as RayTestCluster  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_nodes():
    """A head and one more node, each a raylet of its own; the test process is the driver."""
    cluster = RayTestCluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes(timeout=60)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def ray_job(run_root, kills=(), host="0.0.0.0", **recovery):
    return JobConfig.validate_dict({
        "cluster": {"workers": 2, "servers": 1, "launcher": "ray", "host": host, "ray_cpus_per_role": 0.5},
        "sync": {"policy": "asp"}, "data": {"dataset": "mnist1d", "samples": 4000},
        "train": {"duration_s": 6, "target_accuracy": 0.5, "eval_interval_s": 0.5},
        "faults": {"kills": list(kills), "down_s": 0.5}, "recovery": recovery,
        "out": str(run_root), "progress": False})


def test_a_chain_on_ray_puts_its_replicas_on_different_nodes_and_survives_its_head_dying(two_nodes, run_root):
    summary = Job(ray_job(run_root, ["head:0@2s"], strategy="chain", replicas=2, mode="strong")).run()
    assert summary["status"] == "completed" and summary["best_accuracy"] > 0.4  # it learns (ASP is noisy)
    (run_dir,) = run_root.iterdir()
    (launched,) = events(run_dir, "launched")
    assert launched["launcher"] == "ray"
    nodes = launched["nodes"]
    assert set(nodes) == {"coordinator:0", "server:0", "server:1", "worker:0", "worker:1"}
    assert nodes["server:0"] != nodes["server:1"]  # the placement group spread the chain
    (kill,) = summary["kills"]
    assert kill["role"] == "server" and kill["restarted_at_s"] is not None
    assert kill["recovered_s"] is not None and kill["recovered_s"] < 2.0  # failover to the other replica
    assert kill["lost_updates"] == 0 and summary["updates_applied"] > kill["resumed_version"] + 50
    # Every role's events came back to the driver's run directory, from both nodes.
    assert {e["index"] for e in events(run_dir, "worker_stop")} == {0, 1}
    assert len({e["index"] for e in events(run_dir, "server_stop")}) == 2


def test_a_killed_server_on_ray_resumes_from_its_checkpoint_on_its_node(two_nodes, run_root):
    summary = Job(ray_job(run_root, ["server:0@2s"], strategy="checkpoint", every_updates=25)).run()
    assert summary["status"] == "completed"
    (kill,) = summary["kills"]
    assert kill["resumed_version"] > 0 and summary["updates_applied"] > kill["resumed_version"]
    (run_dir,) = run_root.iterdir()
    pids = [e["pid"] for e in events(run_dir, "member_joined") if e["member_role"] == "server"]
    assert len(set(pids)) == 2  # a second process: the first really died


def test_loopback_roles_on_several_nodes_are_refused_before_anything_starts(two_nodes, run_root):
    with pytest.raises(JobFailed, match="has 2 nodes.*set cluster.host to 0.0.0.0"):
        Job(ray_job(run_root, host="127.0.0.1")).run()


def test_a_users_script_runs_as_the_workers_on_ray(two_nodes, run_root, tmp_path):
    import sys
    script = tmp_path / "script.py"
    script.write_text(
        "import torch, stalwart\n"
        "torch.manual_seed(0)\n"
        "model = torch.nn.Linear(4, 1)\n"
        "x = torch.randn(64, 4); y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])\n"
        "opt = stalwart.ParameterServerOptimizer(model)\n"
        "while opt.clock < 200:\n"
        "    opt.zero_grad(); loss = torch.nn.functional.mse_loss(model(x), y); loss.backward(); opt.step()\n"
        "stalwart.log(loss=loss.item(), worker=stalwart.worker_index())\n")
    config = JobConfig.validate_dict({
        "command": [sys.executable, str(script)],
        "cluster": {"workers": 2, "servers": 1, "launcher": "ray", "host": "0.0.0.0", "ray_cpus_per_role": 0.5},
        "optimizer": {"lr": 0.05}, "out": str(run_root), "progress": False})
    summary = Job(config).run()
    assert summary["status"] == "completed" and summary["workers"] == 2
    assert summary["script_metrics"]["loss"] < 0.05            # worker 0's events came back
    (run_dir,) = run_root.iterdir()
    assert {e["index"] for e in events(run_dir, "metrics")} == {0, 1}
    assert (run_dir / "logs" / "worker-1.err").exists()
