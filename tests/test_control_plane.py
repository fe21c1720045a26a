"""The control plane without a single point of failure: a coordinator that dies and
comes back (rebuilt from the roles' rejoins, or loaded from a real etcd by a standby),
and what it refuses. In-process coordinators for the state; real jobs for the kills."""

import socket
import threading

import pytest

from stalwart.config import JobConfig
from stalwart.control import Coordinator, CoordinatorClient, CoordinatorError, CoordinatorUnavailable, MemoryStore
from stalwart.control.etcd_server import EtcdUnavailable, LocalEtcd
from stalwart.control.store import EPOCH_STRIDE, Deposed, EtcdStore
from stalwart.launch import Job
from stalwart.metrics import EventLog
from stalwart.recovery.chain import Member
from stalwart.transport import Frame, Kind, TcpTransport, dial
from stalwart.transport.base import split_address

from helpers import events

TOKEN = b"k" * 32


def start_coordinator(generation: int, address: tuple[str, int] = ("127.0.0.1", 0), store=None,
                      **shape) -> tuple[Coordinator, threading.Thread]:
    listener = TcpTransport().listen(*address)
    shape = {"servers": 2, "workers": 2, "lease_s": 60.0, "replicas": 2, **shape}
    coordinator = Coordinator(listener, TOKEN, EventLog(None, "coordinator-0"),
                              store=store or MemoryStore(generation), **shape)
    thread = threading.Thread(target=coordinator.run, args=(0.05,), daemon=True)
    thread.start()
    return coordinator, thread


class FakeReplica:
    """A server's control handle as run_server sets it up, with its chain as last read."""

    def __init__(self, address: str, index: int):
        self.control = CoordinatorClient(address, TOKEN, "server", index, patience_s=5.0)
        self.control.register(address=f"127.0.0.1:{20000 + index}")
        self.chain: list = []
        self.control.rejoin_extra = lambda: {"chain": self.chain, "formed": True}

    def read_chain(self) -> None:
        self.chain = self.control.call("chain", shard=self.control.index // 2)["members"]


def comparable(status: dict) -> tuple:
    members = sorted((m["role"], m["index"], m["address"], m["alive"]) for m in status["members"])
    return members, status["chains"], status["state"]


def test_a_restarted_coordinator_rebuilds_membership_chains_and_job_state_from_rejoins():
    old, thread = start_coordinator(generation=1)
    address = old.address
    replicas = [FakeReplica(address, i) for i in range(4)]
    workers = [CoordinatorClient(address, TOKEN, "worker", w) for w in range(2)]
    for w in workers:
        w.register()
    driver = CoordinatorClient(address, TOKEN, "driver", 0)
    driver.register()
    for r in replicas:
        r.read_chain()
    driver.call("stop", reason="the test asked")
    before = driver.call("status")
    seen = max(c.epoch for c in [driver, *workers] + [r.control for r in replicas])
    assert before["chains"] == [[0, 1], [2, 3]] and before["state"] == "stopping"

    old.close()                  # every connection cut, as a SIGKILL would
    old._shutdown.set()
    thread.join(5)
    with pytest.raises(CoordinatorUnavailable):
        driver.call("status", patience_s=0.0)   # nothing answers: the caller is not kept waiting

    new, thread = start_coordinator(generation=2, address=split_address(address))
    try:
        for c in [*workers, *(r.control for r in replicas)]:
            c.call("heartbeat", role=c.role, index=c.index)  # reconnects, and rejoins first
        after = driver.call("status")
        assert comparable(after) == comparable(before)
        assert after["generation"] == 2 and after["epoch"] >= 2 * EPOCH_STRIDE > seen
        assert all(c.reconnects == 1 for c in [driver, *workers])
        # The map is whole again, pulls at each chain's tail, as before the kill.
        assert driver.call("shard_map")["tails"] == ["127.0.0.1:20001", "127.0.0.1:20003"]
    finally:
        new.close()
        new._shutdown.set()


def test_a_chain_view_from_before_the_restart_does_not_undo_a_change_made_after_it():
    coordinator, _ = start_coordinator(generation=3)
    try:
        r = FakeReplica(coordinator.address, 1)  # a process started afresh: this coordinator edits the chain
        r.chain = [[0, "127.0.0.1:20000"], [1, "127.0.0.1:20001"]]
        old_view = {**r.control.rejoin_view(), "seen_epoch": 2 * EPOCH_STRIDE + 5}
        reply = r.control.call("rejoin", **old_view)
        assert reply["epoch"] >= 3 * EPOCH_STRIDE
        assert [Member(*m).index for m in r.control.call("chain", shard=0)["members"]] == [1]
    finally:
        coordinator.close()
        coordinator._shutdown.set()


def test_bad_input_to_the_coordinator_is_refused_by_name_and_it_keeps_serving():
    coordinator, thread = start_coordinator(generation=1)
    address = coordinator.address
    try:
        ok = CoordinatorClient(address, TOKEN, "observer", 0)
        ok.register()
        # Garbage after a real handshake: answered with an ERROR naming the problem, then closed.
        conn = dial(address, TOKEN)
        conn.sock.sendall(b"\x00" * 7 + b"not a frame at all" * 4)
        reply = conn.recv()
        assert reply.kind == Kind.ERROR and reply.meta["reason"]
        conn.close()
        # A frame of the wrong kind.
        conn = dial(address, TOKEN)
        conn.send(Frame(Kind.PUSH, meta={"op": "register"}))
        reply = conn.recv()
        assert reply.kind == Kind.ERROR and "REQUEST" in reply.meta["reason"]
        conn.close()
        # Another job's token: refused at the handshake, before any request.
        with pytest.raises(CoordinatorError, match="wrong job token"):
            CoordinatorClient(address, b"w" * 32, "observer", 1).call("status", patience_s=0.0)
        for args, words in [
            ({"op": "register", "role": "wizard", "index": 0}, "unknown role 'wizard'"),
            ({"op": "register", "role": "server", "index": 9}, "server index 9 is outside this job"),
            ({"op": "register", "role": "worker", "index": "x"}, "is not an integer"),
            ({"op": "teleport"}, "unknown op 'teleport'"),
            ({"op": "heartbeat", "role": "worker", "index": 1}, "worker 1 is not registered"),
            ({"op": "rejoin", "role": "worker", "index": 0, "seen_epoch": 99 * EPOCH_STRIDE},
             "a newer coordinator leads, and this one is stale"),
            ({"op": "rejoin", "role": "worker", "index": 0, "job_state": "dancing"}, "unknown job state"),
            ({"op": "chain_join", "index": 1, "epoch": 5}, "stale epoch 5"),
            ({"op": "status", "surprise": 1}, "bad arguments for 'status'"),
        ]:
            op = args.pop("op")
            with pytest.raises(CoordinatorError, match=words):
                ok.call(op, **args)
        assert ok.call("status")["state"] == "running"  # and it serves on
    finally:
        coordinator.close()
        coordinator._shutdown.set()


# --- real jobs ---------------------------------------------------------------------------

def short_job(run_root, kills, **sections):
    data = {"cluster": {"workers": 2, "servers": 2}, "sync": {"policy": "bsp"},
            "data": {"dataset": "mnist1d", "samples": 4000},
            "train": {"duration_s": 6, "target_accuracy": 0.5, "eval_interval_s": 0.25},
            "faults": {"kills": kills}, "out": str(run_root), "progress": False}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return JobConfig.validate_dict(data)


def only_run(run_root):
    (run_dir,) = run_root.iterdir()
    return run_dir


@pytest.mark.integration
def test_bsp_trains_through_a_coordinator_kill_and_the_restarted_one_rebuilds_from_the_roles(run_root):
    summary = Job(short_job(run_root, ["coordinator:0@1.5s,down=1s"])).run()
    assert summary["status"] == "completed" and summary["final_accuracy"] > 0.5
    (kill,) = summary["kills"]
    assert kill["role"] == "coordinator" and kill["restarted_at_s"] >= kill["at_s"] + 1.0
    assert kill["control_back_s"] is not None and kill["control_back_s"] < 10
    # Training went on while no coordinator was there: the servers' version kept growing.
    during = [p["version"] for p in summary["curve"] if kill["at_s"] < p["elapsed_s"] < kill["restarted_at_s"]]
    before = [p["version"] for p in summary["curve"] if p["elapsed_s"] <= kill["at_s"]]
    assert len(during) >= 2 and during[-1] > during[0] > before[-1], (before, during)
    run_dir = only_run(run_root)
    leads = [e["generation"] for e in events(run_dir, "coordinator_leads")]
    assert leads == [1, 2]
    rejoined = {(e["member_role"], e["member_index"]) for e in events(run_dir, "member_rejoined")}
    assert rejoined == {("server", 0), ("server", 1), ("worker", 0), ("worker", 1), ("driver", 0)}


@pytest.mark.integration
def test_a_strong_chain_loses_no_acknowledged_update_to_a_coordinator_kill_then_a_head_kill(run_root):
    config = short_job(run_root, ["coordinator:0@1.5s,down=0.5s", "head:0@4.5s"],
                       cluster={"servers": 1}, sync={"policy": "asp"}, train={"duration_s": 8},
                       faults={"down_s": 0.5}, recovery={"strategy": "chain", "replicas": 3, "mode": "strong"})
    summary = Job(config).run()
    assert summary["status"] == "completed" and summary["final_accuracy"] > 0.5
    coordinator, head = summary["kills"]
    assert coordinator["control_back_s"] is not None and head["role"] == "server"
    assert head["removed_s"] is not None and head["removed_s"] < 1.0
    assert head["lost_updates"] in (0, None)
    run_dir = only_run(run_root)
    stops = events(run_dir, "worker_stop")
    acked, sent = sum(w["pushes_acked"] for w in stops), sum(w["pushes_sent"] for w in stops)
    final = {e["index"]: e for e in events(run_dir, "server_stop")}
    (version,) = {e["version"] for e in final.values()}
    assert acked <= version <= sent, (acked, version, sent)  # every acknowledged push applied once
    assert len({e["params_crc32"] for e in final.values()}) == 1


# --- etcd --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def etcd():
    try:
        server = LocalEtcd().start()
    except EtcdUnavailable as exc:
        pytest.skip(f"a real etcd is needed: {exc}")
    yield server
    server.stop()


def listening() -> socket.socket:
    return socket.create_server(("127.0.0.1", 0))


def test_the_etcd_store_elects_one_leader_fences_a_deposed_one_and_hands_its_state_on(etcd):
    first_socket = listening()
    first = EtcdStore(etcd.endpoint, "store-test")
    generation = first.lead("127.0.0.1:%d" % first_socket.getsockname()[1], lambda: False)
    assert first.load() is None
    first.save({"epoch": 7, "members": []})
    second = EtcdStore(etcd.endpoint, "store-test")
    won: dict = {}
    stop = threading.Event()
    contender = threading.Thread(target=lambda: won.setdefault("generation", second.lead("127.0.0.1:9", stop.is_set)))
    contender.start()
    contender.join(0.5)
    assert contender.is_alive()          # the leader answers: the standby waits
    first_socket.close()                 # the leader's process is gone: nothing listens there
    contender.join(5)
    assert won["generation"] > generation
    assert second.load() == {"epoch": 7, "members": []}
    with pytest.raises(Deposed):
        first.save({"epoch": 8})         # the old leader can no longer write
    second.save({"epoch": 9})
    assert EtcdStore(etcd.endpoint, "store-test").load() == {"epoch": 9}
    second.close()
    first.close()


@pytest.mark.integration
def test_with_etcd_a_standby_takes_over_a_killed_coordinator_in_under_a_second(run_root, etcd):
    config = short_job(run_root, ["coordinator:0@1.5s"], control={"store": etcd.endpoint})
    summary = Job(config).run()
    assert summary["status"] == "completed" and summary["final_accuracy"] > 0.5
    (kill,) = summary["kills"]
    assert kill["restarted_at_s"] is None   # no restart: the standby is the coordinator now
    run_dir = only_run(run_root)
    leads = sorted(events(run_dir, "coordinator_leads"), key=lambda e: e["t"])
    assert [e["index"] for e in leads] == [0, 1] and leads[1]["restored"]
    (killed,) = [e for e in events(run_dir, "kill")]
    assert leads[1]["t"] - killed["t"] < 1.0
    assert kill["control_back_s"] < 1.0


@pytest.mark.integration
def test_a_coordinator_that_dies_unplanned_is_restarted_by_the_driver(run_root):
    """Not the fault injector's kill: a SIGKILL from outside, as an OOM killer would send."""
    import os
    import signal
    import subprocess
    import time

    config = short_job(run_root, [], train={"duration_s": 5})
    killed: dict = {}

    def kill_the_coordinator_once_training_runs() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            started = list(run_root.glob("*/events/worker-0.jsonl"))
            if started and "worker_start" in started[0].read_text():
                found = subprocess.run(["pgrep", "-f", f"stalwart.launch.role coordinator 0 {run_root}"],
                                       capture_output=True, text=True).stdout.split()
                if found:
                    os.kill(int(found[0]), signal.SIGKILL)
                    killed["pid"] = int(found[0])
                    return
            time.sleep(0.05)  # polling for the moment to strike, bounded by the deadline

    striker = threading.Thread(target=kill_the_coordinator_once_training_runs, daemon=True)
    striker.start()
    summary = Job(config).run()
    striker.join(5)
    assert killed and summary["status"] == "completed" and summary["final_accuracy"] > 0.5
    (restart,) = events(only_run(run_root), "restart")
    assert restart["member_role"] == "coordinator" and "SIGKILL" in restart["unplanned"]
    assert [e["generation"] for e in events(only_run(run_root), "coordinator_leads")] == [1, 2]


def test_the_control_experiment_reads_outage_figures_from_a_summary():
    from stalwart.experiments.control import aggregate, measures
    curve = [{"elapsed_s": t, "version": v, "accuracy": 0.9} for t, v in [(4, 100), (8, 300), (9, 340), (11, 420), (13, 520)]]
    summary = {"status": "completed", "final_accuracy": 0.95, "lost_updates": 0, "curve": curve,
               "kills": [{"role": "coordinator", "index": 0, "at_s": 8.0, "control_back_s": 3.0}]}
    row = measures(summary)
    assert row["rate_before"] == 50.0          # (300 - 100) / (8 - 4)
    assert row["rate_during"] == 40.0          # (420 - 300) / (11 - 8)
    assert row["lost_updates"] is None         # no server was killed: nothing to lose
    server_kill = dict(summary, kills=[{"role": "server", "index": 0, "at_s": 8.0, "removed_s": 0.03}])
    assert measures(server_kill)["removed_s"] == 0.03 and measures(server_kill)["lost_updates"] == 0
    result = aggregate([dict(summary, group="coordinator restart", seed=s) for s in range(3)],
                       ("coordinator restart",), 3, 8.0, 2.0, {})
    (agg,) = result["rows"]
    assert agg["completed"] == 3 and agg["control_back_s"] == 3.0 and agg["rate_during_range"] == (40.0, 40.0)


def test_a_finished_jobs_state_is_left_in_etcd_only_under_a_lease(etcd):
    store = EtcdStore(etcd.endpoint, "finished-job")
    with listening() as sock:
        store.lead("127.0.0.1:%d" % sock.getsockname()[1], lambda: False)
        store.save({"state": "running"})
        assert "lease" not in store._get("state")            # a running job's state outlives any lease
        store.save({"state": "shutdown"})
        held = store._get("state")
        assert int(held["lease"]) > 0 and store.load() == {"state": "shutdown"}
        store.close()


def test_the_layout_is_fixed_by_the_first_worker_and_survives_a_restart_through_rejoins():
    old, thread = start_coordinator(generation=1, replicas=1)
    address = old.address
    first, second = (CoordinatorClient(address, TOKEN, "worker", w, patience_s=5.0) for w in range(2))
    for w in (first, second):
        w.register()
    bounds = first.layout(100, digest="aaaa")
    assert bounds[0] == 0 and bounds[-1] == 100 and len(bounds) == 3
    assert second.layout(100, digest="aaaa") == bounds                  # the same model: the same layout
    with pytest.raises(CoordinatorError, match="has 90 parameters; the job's servers hold 100"):
        second.layout(90, digest="aaaa")
    with pytest.raises(CoordinatorError, match="other names or shapes"):
        second.layout(100, digest="bbbb")
    old.close()                  # every connection cut, as a SIGKILL would
    old._shutdown.set()
    thread.join(5)
    # A coordinator restarted in memory learns the layout from the first member that rejoins.
    new, _ = start_coordinator(generation=2, address=split_address(address), replicas=1)
    try:
        assert new.layout is None
        first.call("heartbeat", role="worker", index=0)  # dials again: a rejoin that carries the layout
        assert new.layout["bounds"] == bounds and new.layout["digest"] == "aaaa"
    finally:
        for w in (first, second):
            w.close()
        new.close()
        new._shutdown.set()
