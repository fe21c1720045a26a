"""Real SIGKILLs of real processes, and what each recovery strategy makes of them."""

import numpy as np
import pytest

from stalwart.config import JobConfig
from stalwart.launch import Job, JobFailed
from stalwart.launch.cluster import Cluster
from stalwart.metrics import EventLog
from stalwart.shard import Snapshot
from stalwart.recovery import Checkpointer
from stalwart.worker.client import ParameterClient

from helpers import events, pid_alive

pytestmark = pytest.mark.integration


def job(run_root, kills, recovery="checkpoint", down_s=0.5, duration=7, **extra):
    return JobConfig.validate_dict({
        "cluster": {"workers": 2, "servers": 2}, "sync": {"policy": "bsp"},
        "data": {"dataset": "mnist1d", "samples": 4000},
        "train": {"duration_s": duration, "target_accuracy": 0.5, "eval_interval_s": 0.5},
        "faults": {"kills": kills, "down_s": down_s},
        "recovery": {"strategy": recovery, "every_updates": 25},
        "out": str(run_root), "progress": False, **extra})


def only_run(run_root):
    (run_dir,) = run_root.iterdir()
    return run_dir


def test_a_killed_server_resumes_from_its_checkpoint_and_training_goes_on(run_root):
    summary = Job(job(run_root, ["server:0@2.5s"])).run()
    assert summary["status"] == "completed" and summary["recovery"] == "checkpoint"
    (kill,) = summary["kills"]
    assert kill["role"] == "server" and kill["index"] == 0 and kill["restarted_at_s"] >= kill["at_s"] + 0.5
    assert kill["recovered_s"] is not None and kill["recovered_s"] < 10
    assert kill["resumed_version"] > 0                      # a checkpoint was taken and loaded
    assert summary["updates_applied"] > kill["resumed_version"] + 10  # and training went on after it
    # updates since the last persisted snapshot are lost, no more than a couple of intervals
    assert 0 <= summary["lost_updates"] <= 2 * 25
    run_dir = only_run(run_root)
    reconnects = events(run_dir, "reconnected")
    assert {e["index"] for e in reconnects} == {0, 1} and all(e["shard"] == 0 for e in reconnects)
    assert all(e["attempts"] >= 1 and e["waited_s"] > 0 for e in reconnects)
    assert events(run_dir, "checkpoint_loaded")
    after = [p["accuracy"] for p in summary["curve"] if p["elapsed_s"] > kill["at_s"] + kill["recovered_s"]]
    assert after and after[-1] > 0.5


def test_without_recovery_a_server_kill_ends_the_job_with_a_clear_error(run_root):
    config = job(run_root, ["server:1@1.5s"], recovery="none", down_s=None)
    with pytest.raises(JobFailed, match="server 1 was killed \\(fault injection\\) and recovery is 'none'"):
        Job(config).run()
    run_dir = only_run(run_root)
    assert (run_dir / "summary.json").exists()
    pids = [e["pid"] for e in events(run_dir, "member_joined") if e.get("pid") and e["member_role"] != "driver"]
    assert pids and not any(pid_alive(p) for p in pids)


def test_a_killed_worker_restarts_and_rejoins_the_barrier(run_root):
    summary = Job(job(run_root, ["worker:1@clock=40"], recovery="none", down_s=0.3)).run()
    assert summary["status"] == "completed"
    (kill,) = summary["kills"]
    assert kill["role"] == "worker" and kill["restarted_at_s"] is not None
    assert kill["recovered_s"] is not None and kill["recovered_s"] < 5  # the barrier stopped waiting for it
    # the restarted worker continued from the barrier's clock, not from 0; the two differ
    # only by what one did alone after the other noticed the stop (a heartbeat or so)
    fast, rejoined = summary["iterations_per_worker"]
    assert rejoined > 40 and abs(fast - rejoined) <= 30


def test_a_restarted_server_skips_a_corrupted_newest_checkpoint(tmp_path):
    size = 64
    folder = tmp_path / "ckpt"
    log = EventLog.for_role(tmp_path / "prep", "test", 0)
    ck = Checkpointer(folder, 0, log, every_updates=1, every_s=None, keep=5)
    for version, value in [(10, 1.5), (20, 2.5)]:
        ck.snapshot(Snapshot(0, version, True, {"params": np.full(size, value, np.float32),
                                                "opt.buf": np.zeros(size, np.float32)},
                             {"optimizer": {"steps": version}}))
        assert ck.flush()
    ck.close()
    newest = ck.files()[0]
    data = bytearray(newest.read_bytes())
    data[100] ^= 0xFF  # one flipped bit pattern in the middle of the parameters
    newest.write_bytes(bytes(data))

    config = JobConfig.validate_dict({"cluster": {"workers": 1, "servers": 1}, "sync": {"policy": "asp"},
                                      "recovery": {"strategy": "checkpoint", "dir": str(folder)},
                                      "progress": False})
    (tmp_path / "run").mkdir()
    cluster = Cluster.start(config, tmp_path / "run", [0, size])
    control, shards = cluster.connect("observer")
    try:
        client = ParameterClient(shards, [0, size], cluster.token)
        params = np.zeros(size, np.float32)
        assert client.pull(params, wait=False) == [10]
        np.testing.assert_array_equal(params, np.full(size, 1.5, np.float32))
        client.close()
    finally:
        cluster.stop(control)
    (skipped,) = events(tmp_path / "run", "checkpoint_skipped")
    assert skipped["path"] == newest.name and "checksum" in skipped["reason"]


def chain_job(run_root, kills, replicas=3, mode="strong", every=200, duration=9.5, servers=1):
    return JobConfig.validate_dict({
        "cluster": {"workers": 2, "servers": servers}, "sync": {"policy": "asp"},
        "data": {"dataset": "mnist1d", "samples": 4000},
        "train": {"duration_s": duration, "target_accuracy": 0.5, "eval_interval_s": 0.5},
        "faults": {"kills": kills, "down_s": 0.5},
        "recovery": {"strategy": "chain", "replicas": replicas, "mode": mode, "every_updates": every},
        "out": str(run_root), "progress": False})


def test_strong_chain_loses_no_acknowledged_update_when_head_middle_and_tail_die(run_root):
    # 3 s between kills: a restarted replica must be back in the chain (process start-up,
    # state transfer) for the next position to exist, on 2 cores shared with the job.
    rules = ["head:0@2s", "middle:0@5s", "tail:0@8s"]
    summary = Job(chain_job(run_root, rules, duration=10.5)).run()
    assert summary["status"] == "completed" and summary["recovery"] == "chain/strong"
    assert [k["rule"] for k in summary["kills"]] == rules
    for kill in summary["kills"]:
        assert kill["recovered_s"] is not None and kill["recovered_s"] < 1.0, kill  # failover
        assert kill["lost_updates"] in (0, None) and kill["restarted_at_s"] is not None
    run_dir = only_run(run_root)
    # Every acknowledged push is applied, none twice: under ASP a push is one update.
    stops = events(run_dir, "worker_stop")
    acked = sum(w["pushes_acked"] for w in stops)
    sent = sum(w["pushes_sent"] for w in stops)
    final = {e["index"]: e for e in events(run_dir, "server_stop")}
    assert len(final) == 3  # the killed replicas came back and joined at the tail
    versions = {e["version"] for e in final.values()}
    (version,) = versions
    assert acked <= version <= sent, (acked, version, sent)
    assert len({e["params_crc32"] for e in final.values()}) == 1  # bit-identical replicas
    joined = events(run_dir, "replica_joined")
    assert len(joined) == 3 and len(joined[-1]["chain"]) == 3
    assert summary["final_accuracy"] > 0.5


def test_relaxed_chain_loses_at_most_the_updates_since_its_last_state(run_root):
    summary = Job(chain_job(run_root, ["head:0@2.5s"], replicas=2, mode="relaxed", every=30,
                            duration=5)).run()
    assert summary["status"] == "completed" and summary["recovery"] == "chain/relaxed"
    (kill,) = summary["kills"]
    assert kill["recovered_s"] is not None and kill["recovered_s"] < 1.0
    assert kill["lost_updates"] is not None and 0 <= kill["lost_updates"] <= 30 + 2
    assert events(only_run(run_root), "state_installed")
