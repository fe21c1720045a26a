"""Stateless recovery: flush rules, the bounded backlog, the rebuild, and a real SIGKILL."""

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stalwart.config import ConfigError, JobConfig
from stalwart.launch import Job
from stalwart.metrics import EventLog
from stalwart.recovery.stateless import OuterMerge, RebuildWindow, StatelessRecovery, flush_scale
from stalwart.optim import build_optimizer
from stalwart.server.server import ParameterServer
from stalwart.shard import ShardState
from stalwart.sync import parse_policy
from stalwart.transport import Frame, Kind, TcpTransport, dial
from stalwart.worker.failover import ServerUnavailable
from stalwart.worker.trainthrough import Backlog, TrainThrough

from helpers import events

SIZE = 64


# --- flush rules ------------------------------------------------------------------------
def test_sum_adds_each_backlog_whole():
    assert flush_scale("sum", np.ones(4, np.float32), workers=4, staleness=7, clip_norm=0.1) == 1.0


def test_mean_weighs_each_backlog_one_over_the_workers():
    assert flush_scale("mean", np.ones(4, np.float32), workers=4, staleness=7, clip_norm=0.1) == 0.25


@pytest.mark.parametrize("staleness, expected", [(0, 1.0), (1, 0.5), (3, 0.25), (-2, 1.0)])
def test_staleness_scales_by_one_over_one_plus_staleness(staleness, expected):
    assert flush_scale("staleness", np.ones(4, np.float32), 4, staleness, 0.1) == expected


def test_clip_bounds_the_norm_of_the_applied_change_and_leaves_small_ones_as_mean():
    big = np.full(100, 3.0, np.float32)               # norm 30, /4 workers = 7.5
    scale = flush_scale("clip", big, workers=4, staleness=0, clip_norm=1.5)
    assert np.linalg.norm(scale * big) == pytest.approx(1.5, rel=1e-6)
    small = np.full(100, 0.01, np.float32)            # norm 0.1, /4 = 0.025 < 1.5
    assert flush_scale("clip", small, 4, 0, 1.5) == 0.25
    assert flush_scale("clip", np.zeros(3, np.float32), 4, 0, 1.5) == 0.25


def test_an_unknown_flush_rule_is_named():
    with pytest.raises(ValueError, match="unknown flush rule 'median'"):
        flush_scale("median", np.ones(2, np.float32), 2, 0, 1.0)


# --- the backlog --------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(bound=st.integers(1, 20), changes=st.lists(st.lists(st.floats(-10, 10), min_size=3, max_size=3),
                                                  max_size=40))
def test_a_backlog_sums_at_most_its_bound_and_keeps_its_size(bound, changes):
    backlog = Backlog(np.zeros(3, np.float32), base_version=5, bound=bound)
    accepted = [backlog.add(np.array(c, np.float32)) for c in changes]
    assert accepted == [i < bound for i in range(len(changes))]
    assert backlog.count == min(bound, len(changes))
    expected = np.sum(np.array(changes[:bound], np.float32), axis=0) if changes else np.zeros(3)
    np.testing.assert_allclose(backlog.delta, expected, rtol=1e-5, atol=1e-4)
    assert backlog.delta.shape == (3,)  # a running sum, never a list of updates


def test_the_base_is_a_copy_of_the_shard_at_detachment():
    shard = np.arange(4, dtype=np.float32)
    backlog = Backlog(shard, base_version=3, bound=2)
    shard += 100
    np.testing.assert_array_equal(backlog.base, np.arange(4))


# --- the rebuild window -------------------------------------------------------------------
def test_the_highest_version_wins_and_ties_go_to_the_earliest():
    w = RebuildWindow(workers=3, window_s=1.0)
    w.offer("worker 0", 7, 10, np.full(2, 7.0, np.float32), now=0.0, worker=0)
    w.offer("worker 1", 9, 12, np.full(2, 9.0, np.float32), now=0.1, worker=1)
    w.offer("worker 2", 9, 11, np.full(2, -1.0, np.float32), now=0.2, worker=2)
    assert (w.best_version, w.best_source, w.max_clock) == (9, "worker 1", 12)
    np.testing.assert_array_equal(w.best, [9.0, 9.0])
    assert w.time_left(0.3) == 0.0  # every worker has offered: no reason to wait


def test_the_window_closes_after_its_time_without_every_worker():
    w = RebuildWindow(workers=3, window_s=1.0)
    assert w.time_left(5.0) == float("inf") and not w.is_open
    w.offer("worker 0", 4, 0, np.zeros(2, np.float32), now=2.0, worker=0)
    assert w.time_left(2.5) == pytest.approx(0.5) and w.time_left(3.0) <= 0


def test_a_newer_own_snapshot_beats_older_worker_copies():
    w = RebuildWindow(workers=2, window_s=1.0)
    w.offer("snapshot", 50, 0, np.full(2, 5.0, np.float32), now=0.0)
    assert not w.is_open  # the snapshot alone opens nothing; the first worker does
    w.offer("worker 0", 40, 3, np.zeros(2, np.float32), now=1.0, worker=0)
    assert w.is_open and w.best_source == "snapshot" and w.best_version == 50


# --- the worker's side, against a client that never gets its server back -------------------
class UnreachableShard:
    """A client whose shard 0 is detached and whose server never answers again."""

    def __init__(self, size):
        self.bounds, self.detached, self.broken, self.versions = [0, size], {0}, {0}, [11]
        self.attempts = 0

    def reattach(self, s, base, version, clock):
        self.attempts += 1
        raise ConnectionRefusedError("nothing listens there")

    def detach(self, s):
        self.detached.add(s)


def make_sgd(size):
    return build_optimizer("sgd", size, lr=0.1, momentum=0.0)


def test_dropping_when_full_keeps_training_locally_without_owing_more():
    client, seen = UnreachableShard(4), []
    tt = TrainThrough(client, make_sgd, bound=3, when_full="drop", retry_s=0.0,
                      on_event=lambda name, **f: seen.append(name))
    params, grad = np.zeros(4, np.float32), np.ones(4, np.float32)
    for clock in range(10):
        assert tt.step(grad, params, clock) == []
    backlog = tt.backlogs[0]
    np.testing.assert_allclose(params, -1.0, rtol=1e-6)  # ten local SGD steps of 0.1
    assert (backlog.count, backlog.steps) == (3, 10)      # but only three owed
    np.testing.assert_allclose(backlog.delta, -0.3, rtol=1e-6)
    np.testing.assert_array_equal(backlog.base, 0.0)
    assert backlog.base_version == 11
    assert seen.count("detached") == 1 and seen.count("backlog_full") == 1
    assert client.attempts == 10 and tt.compute_while_down_s > 0


def test_waiting_when_full_stops_computing_and_gives_up_after_the_reconnect_budget():
    client = UnreachableShard(4)
    tt = TrainThrough(client, make_sgd, bound=2, when_full="wait", retry_s=0.02, reconnect_s=0.3)
    params, grad = np.zeros(4, np.float32), np.ones(4, np.float32)
    tt.step(grad, params, 0)
    tt.step(grad, params, 1)
    with pytest.raises(ServerUnavailable, match="backlog is full \\(2 steps\\)"):
        tt.step(grad, params, 2)
    np.testing.assert_allclose(params, -0.2, rtol=1e-6)  # no local step beyond the bound
    assert tt.backlogs[0].count == 2


def test_an_unknown_backlog_policy_is_refused():
    with pytest.raises(ValueError, match="unknown backlog policy 'grow'"):
        TrainThrough(UnreachableShard(2), make_sgd, bound=1, when_full="grow")


def test_config_refuses_stateless_under_elastic_bsp():
    with pytest.raises(ConfigError, match="stateless recovery is not supported under ElasticBSP"):
        JobConfig.validate_dict({"recovery": {"strategy": "stateless"}, "sync": {"policy": "elastic:8"}})


def test_config_refuses_stateless_snapshots_without_a_trigger():
    with pytest.raises(ConfigError, match="stateless recovery with snapshots needs every_updates"):
        JobConfig.validate_dict({"recovery": {"strategy": "stateless", "snapshot": True, "every_updates": None}})


# --- a stateless server in this process: rebuild from offers, flush, bad input --------------
def in_process_server(recovery=None):
    log = EventLog(None, "server")
    shard = ShardState(0, SIZE, make_sgd(SIZE), parse_policy("asp")(2, SIZE), 2, log)
    return ParameterServer(TcpTransport().listen("127.0.0.1"), b"t" * 32, log, shard, recovery).start()


@pytest.fixture
def stateless_server():
    server = in_process_server(StatelessRecovery(RebuildWindow(workers=2, window_s=5.0), "mean", 1.0))
    yield server, server.token
    server.shard.stop_waiting()
    server.close()


def offer(address, token, worker, version, value):
    conn = dial(address, token, max_payload=SIZE * 4)
    conn.send(Frame(Kind.INIT, worker=worker, clock=100 + worker, meta={"version": version}),
              memoryview(np.full(SIZE, value, np.float32)).cast("B"))
    return conn


def test_a_fresh_server_rebuilds_from_the_freshest_copy_then_applies_flushes(stateless_server):
    server, token = stateless_server
    replies = {}
    conns = [offer(server.address, token, 0, 30, 3.0)]
    # the server waits for the second worker (within its window) before it chooses
    reader = threading.Thread(target=lambda: replies.update(a=conns[0].recv()))
    reader.start()
    conns.append(offer(server.address, token, 1, 42, 4.0))
    replies["b"] = conns[1].recv()
    reader.join(10)
    assert replies["a"].clock == replies["b"].clock == 42                    # both told the version
    assert replies["a"].meta["resume_clock"] == replies["b"].meta["resume_clock"] == 102
    assert server.shard.version == 42 and np.all(server.shard.params == 4.0)

    conns[0].send(Frame(Kind.FLUSH, worker=0, meta={"count": 5, "base_version": 30}),
                  memoryview(np.full(SIZE, 2.0, np.float32)).cast("B"))
    ack = conns[0].recv()
    assert ack.kind == Kind.ACK and ack.clock == 43
    assert ack.meta == {"staleness": 12, "scale": 0.5}
    np.testing.assert_allclose(server.shard.params, 4.0 + 0.5 * 2.0)              # mean over 2 workers

    # malformed flushes are refused by name; the shard is untouched and the server serves on
    for meta, payload, reason in [
            ({"count": "5", "base_version": 1}, np.ones(SIZE, np.float32), "integer count"),
            ({"count": 1, "base_version": 1}, np.full(SIZE, np.nan, np.float32), "NaN or infinite"),
    ]:
        conns[1].send(Frame(Kind.FLUSH, worker=1, meta=meta), memoryview(payload).cast("B"))
        assert reason in conns[1].recv().meta["reason"]
    np.testing.assert_allclose(server.shard.params, 5.0)
    assert server.shard.version == 43
    for c in conns:
        c.close()


def test_a_huge_flush_is_refused_by_name_and_the_shard_is_untouched(stateless_server):
    server, token = stateless_server
    conns = [offer(server.address, token, w, 10, 1.0) for w in (0, 1)]
    for c in conns:
        assert c.recv().kind == Kind.ACK
    before = server.shard.params.copy()
    conns[0].send(Frame(Kind.FLUSH, worker=0, meta={"count": 5, "base_version": 10}),
                  memoryview(np.full(SIZE, 1e6, np.float32)).cast("B"))   # a million times the shard
    reason = conns[0].recv().meta["reason"]
    assert "its change has L2 norm" in reason and "more than 10x" in reason and "untouched" in reason
    np.testing.assert_array_equal(server.shard.params, before)
    assert server.shard.version == 10
    for c in conns:
        c.close()


def test_the_outer_merge_is_one_nesterov_step_on_the_step_weighted_mean_change():
    merge = OuterMerge(workers=2, window_s=5.0, lr=0.7, momentum=0.9)
    params = np.zeros(4, np.float32)
    merge.add(0, np.array([1, 0, 0, 0], np.float32), 1, now=0.0)
    assert merge.time_left(1.0) == 4.0          # one of two backlogs in: the window is open
    merge.add(1, np.array([0, 4, 0, 0], np.float32), 3, now=0.5)
    assert merge.time_left(1.0) == 0.0          # every worker's in: it closes at once
    outer, grad, merged = merge.close(4)
    mean = np.array([0.25, 3.0, 0, 0])          # weighted by local steps: (1*d0 + 3*d1) / 4
    np.testing.assert_allclose(grad, -mean)
    outer.step(params, grad)
    # A fresh Nesterov buffer: the first step is lr * (1 + momentum) = 1.33 times the mean.
    np.testing.assert_allclose(params, 1.33 * mean, rtol=1e-6)
    assert merged == 2 and merge.pending == [] and merge.merges == 1

    # A second outage: the buffer carried over adds momentum * (its first value).
    merge.add(0, np.array([0, 0, 2, 0], np.float32), 2, now=10.0)
    outer2, grad2, _ = merge.close(4)
    assert outer2 is outer
    outer.step(params, grad2)
    buf = 0.9 * (-mean) + np.array([0, 0, -2, 0])          # v = momentum * v + g
    expected = 1.33 * mean - 0.7 * (np.array([0, 0, -2, 0]) + 0.9 * buf)
    np.testing.assert_allclose(params, expected, rtol=1e-5)


def test_no_local_steps_no_merge_step():
    merge = OuterMerge(workers=1, window_s=1.0, lr=0.7, momentum=0.9)
    merge.add(0, np.zeros(3, np.float32), 0, now=0.0)
    assert merge.close(3)[1] is None


def test_the_outer_rule_acknowledges_every_flush_once_the_merge_is_applied():
    server = in_process_server(StatelessRecovery(RebuildWindow(workers=2, window_s=5.0), "outer", 1.0))
    try:
        conns = [offer(server.address, server.token, w, 20, 1.0) for w in (0, 1)]
        for c in conns:
            assert c.recv().kind == Kind.ACK
        acks = {}
        conns[0].send(Frame(Kind.FLUSH, worker=0, meta={"count": 2, "base_version": 20}),
                      memoryview(np.full(SIZE, 0.5, np.float32)).cast("B"))
        waiter = threading.Thread(target=lambda: acks.update(a=conns[0].recv()))
        waiter.start()
        assert server.shard.version == 20            # held: the second worker's backlog is not in yet
        conns[1].send(Frame(Kind.FLUSH, worker=1, meta={"count": 2, "base_version": 20}),
                      memoryview(np.full(SIZE, 1.5, np.float32)).cast("B"))
        acks["b"] = conns[1].recv()
        waiter.join(10)
        assert acks["a"].clock == acks["b"].clock == 21                 # one merge, one version
        np.testing.assert_allclose(server.shard.params, 1.0 + 1.33 * 1.0, rtol=1e-6)  # mean change 1.0
        for c in conns:
            c.close()
    finally:
        server.shard.stop_waiting()
        server.close()


def test_a_flush_to_a_server_that_is_not_stateless_is_refused():
    server = in_process_server()
    conn = dial(server.address, server.token, max_payload=SIZE * 4)
    conn.send(Frame(Kind.FLUSH, worker=0, meta={"count": 1, "base_version": 0}),
              memoryview(np.ones(SIZE, np.float32)).cast("B"))
    assert "needs stateless recovery" in conn.recv().meta["reason"]
    # refused, not dropped: the connection still serves
    conn.send(Frame(Kind.PULL))
    assert "holds no parameters yet" in conn.recv().meta["reason"]  # an observer, before any INIT
    conn.close()
    server.close()


# --- a real SIGKILL ---------------------------------------------------------------------------
def stateless_job(run_root, sync, kills, down_s, servers=1, duration_s=9, **recovery):
    return JobConfig.validate_dict({
        "cluster": {"workers": 3, "servers": servers}, "sync": {"policy": sync},
        "data": {"dataset": "mnist1d", "samples": 4000},
        "train": {"duration_s": duration_s, "target_accuracy": 0.5, "eval_interval_s": 0.5},
        "faults": {"kills": kills, "down_s": down_s},
        "recovery": {"strategy": "stateless", "rebuild_window_s": 2.0, **recovery},
        "out": str(run_root), "progress": False})


@pytest.mark.integration
def test_workers_train_through_a_sigkilled_server_and_rebuild_it(run_root):
    # BSP over two shards: the live shard's barrier must let the workers go and take them back
    # 12 s: a merge can still set the model back for a while: the mean of copies that
    # trained apart from an early point is worse than each of them (docs/experiments.md, the failure
    # experiment); 9 s left 2 of 11 runs below their pre-kill accuracy, each one whose
    # training had started slowly (0.41 at the kill).
    summary = Job(stateless_job(run_root, "bsp", ["server:0@3s"], down_s=2.0, servers=2, duration_s=12)).run()
    assert summary["status"] == "completed" and summary["recovery"] == "stateless"
    (kill,) = summary["kills"]
    (run_dir,) = run_root.iterdir()
    flushed = events(run_dir, "flushed")
    # every worker kept computing, on its whole model, while shard 0's server was dead...
    assert sorted((e["shard"], e["index"]) for e in flushed) == [(s, w) for s in (0, 1) for w in (0, 1, 2)]
    assert all(e["local_steps"] > 10 and e["count"] == e["local_steps"] and e["compute_s"] > 0.3 for e in flushed)
    assert summary["compute_while_down_s"] > 1.0
    # ...worker 0 scored its own copy meanwhile, so the curve goes on through the outage...
    local = summary["local_curve"]
    assert local and all(kill["at_s"] < p["elapsed_s"] < kill["at_s"] + kill["recovered_s"] + 1.0 for p in local)
    assert all(0.0 <= p["accuracy"] <= 1.0 for p in local)
    # ...the fresh server took the freshest copy, then every backlog...
    (rebuilt,) = events(run_dir, "rebuilt")
    assert rebuilt["shard"] == 0
    assert rebuilt["version"] == max(e["base_version"] for e in flushed if e["shard"] == 0) \
        == kill["resumed_version"] > 0
    assert len(events(run_dir, "flush_applied")) == 6 and summary["lost_updates"] == 0
    # ...and training went on past where it stood when the server died
    assert kill["accuracy_before"] is not None
    assert summary["final_accuracy"] > kill["accuracy_before"]
    assert summary["updates_applied"] > rebuilt["version"] + 10


@pytest.mark.integration
def test_the_backlog_bound_holds_through_a_long_outage(run_root):
    summary = Job(stateless_job(run_root, "asp", ["server:0@2s"], down_s=4.0, backlog_max=40)).run()
    assert summary["status"] == "completed"
    (run_dir,) = run_root.iterdir()
    flushed = events(run_dir, "flushed")
    assert sorted(e["index"] for e in flushed) == [0, 1, 2]
    # waiting when full: nobody owed or computed more than the bound, however long the outage
    assert all(e["count"] == e["local_steps"] == 40 for e in flushed)
    assert all(e["down_s"] > 3.0 for e in flushed)
    assert len(events(run_dir, "backlog_full")) == 3
