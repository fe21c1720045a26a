"""Pushes overlapped with backward: buckets, pushes in parts, and the same result as without."""

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stalwart.config import JobConfig
from stalwart.data import load_dataset
from stalwart.launch.cluster import Cluster
from stalwart.layout import ParameterLayout
from stalwart.models import build_model
from stalwart.transport import Flag, Frame, Kind, dial
from stalwart.worker.client import ParameterClient
from stalwart.worker.optimizer import ParameterServerOptimizer
from stalwart.worker.overlap import cut_buckets


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=12), cap=st.integers(1, 120),
       shards=st.integers(1, 4), data=st.data())
def test_buckets_cover_the_gradient_once_and_never_cross_a_shard(sizes, cap, shards, data):
    total = sum(sizes)
    inner = sorted(data.draw(st.lists(st.integers(1, max(1, total - 1)), min_size=shards - 1,
                                      max_size=shards - 1))) if total > 1 else []
    bounds = sorted(set([0, *inner, total]))
    buckets = cut_buckets(sizes, bounds, cap)
    # In the order backward fills them: from the end of the vector to its start.
    assert [b.hi for b in buckets] == sorted((b.hi for b in buckets), reverse=True)
    spans = sorted((b.lo, b.hi) for b in buckets)
    assert spans[0][0] == 0 and spans[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, no overlap
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for b in buckets:
        assert bounds[b.shard] <= b.lo < b.hi <= bounds[b.shard + 1]
        assert b.at == b.lo - bounds[b.shard]
        assert b.whole == ((b.lo, b.hi) == (bounds[b.shard], bounds[b.shard + 1]))
        assert b.params == [i for i in range(len(sizes)) if offsets[i] < b.hi and b.lo < offsets[i + 1]]


SIZES = (60_000, 45_000)  # two shards, large enough for parts to go through shared memory


def _cluster(tmp_path, name, workers=3, shm=True):
    config = JobConfig.validate_dict({"cluster": {"workers": workers, "servers": 2, "shm": shm},
                                      "sync": {"policy": "bsp"},
                                      "optimizer": {"name": "adam", "lr": 0.01}, "progress": False})
    run_dir = tmp_path / name
    run_dir.mkdir()
    bounds = [0, SIZES[0], sum(SIZES)]
    return Cluster.start(config, run_dir, bounds), bounds


def _train(tmp_path, name, parts_for, shm, rounds=4):
    """Three workers push seeded gradients under BSP, one after another in worker order
    (so the server's sums are in one order); ``parts_for`` push in random parts."""
    cluster, bounds = _cluster(tmp_path, name, shm=shm)
    control = None
    try:
        control, shards = cluster.connect("observer")
        clients = [ParameterClient(shards, bounds, cluster.token, worker=w, transport="tcp") for w in range(3)]
        start = np.random.default_rng(7).standard_normal(bounds[-1]).astype(np.float32)
        params = [start.copy() for _ in clients]
        for c, p in zip(clients, params):
            c.init(p)
        rng = np.random.default_rng(11)
        for clock in range(rounds):
            for w, c in enumerate(clients):
                grad = np.random.default_rng([clock, w]).standard_normal(bounds[-1]).astype(np.float32)
                if w in parts_for:
                    for s in range(2):
                        lo, hi = bounds[s], bounds[s + 1]
                        cuts = sorted(set(rng.integers(1, hi - lo, size=2).tolist()))
                        pieces = list(zip([0, *cuts], [*cuts, hi - lo]))
                        for at, end in (pieces[i] for i in rng.permutation(len(pieces))):
                            c.push_part(s, grad[lo + at:lo + end], at, clock)
                    c.push_pull(grad, None, clock, pushed=frozenset({0, 1}))
                else:
                    c.push(grad, clock)
            for c, p in zip(clients, params):
                c.pull(p, clock)
        assert all(c.versions == [rounds, rounds] for c in clients)
        for c in clients:
            c.leave()
            c.close()
        return params[0]
    finally:
        cluster.stop(control)


@pytest.mark.integration
def test_a_push_in_parts_gives_the_servers_the_same_bytes_as_a_whole_push(tmp_path):
    whole = _train(tmp_path, "whole", parts_for=set(), shm=False)
    in_parts = _train(tmp_path, "parts", parts_for={0, 2}, shm=True)
    assert whole.tobytes() == in_parts.tobytes()


@pytest.mark.integration
def test_malformed_parts_are_refused_by_name_and_the_shard_stays_intact(tmp_path):
    cluster, bounds = _cluster(tmp_path, "bad", workers=1)
    control = None
    try:
        control, shards = cluster.connect("observer")
        n = SIZES[0]
        cases = [
            ({"at": "x"}, 10, "integer meta 'at'"),
            ({"at": n - 5}, 10, "lies outside the shard"),
            ({"at": -1}, 10, "lies outside the shard"),
        ]
        for meta, floats, reason in cases:
            conn = dial(shards[0], cluster.token, max_payload=4 * n)
            conn.send(Frame(Kind.PUSH, shard=0, worker=0, seq=1, flags=Flag.PART, meta=meta),
                      np.zeros(floats, np.float32))
            assert reason in conn.recv().meta["reason"]
            conn.close()
        # An overlap, another push's part, and a pull, each in the middle of a push in parts.
        for second, reason in [
            (Frame(Kind.PUSH, shard=0, worker=0, seq=1, flags=Flag.PART, meta={"at": 5}), "overlaps part [0, 10)"),
            (Frame(Kind.PUSH, shard=0, worker=0, seq=2, flags=Flag.PART, meta={"at": 20}), "still incomplete"),
            (Frame(Kind.PULL, shard=0, worker=0, seq=1), "came in parts and is incomplete; got PULL"),
        ]:
            conn = dial(shards[0], cluster.token, max_payload=4 * n)
            conn.send(Frame(Kind.PUSH, shard=0, worker=0, seq=1, flags=Flag.PART, meta={"at": 0}),
                      np.zeros(10, np.float32))
            conn.send(second, None if second.kind == Kind.PULL else np.zeros(10, np.float32))
            assert reason in conn.recv().meta["reason"]
            conn.close()
        # Nothing half-gathered was applied: a worker still starts and trains from clock 0.
        client = ParameterClient(shards, bounds, cluster.token, worker=0)
        params = np.ones(bounds[-1], np.float32)
        assert client.init(params) == 0
        client.push_pull(np.zeros(bounds[-1], np.float32), params, 0)
        assert client.versions == [1, 1]
        client.leave()
        client.close()
    finally:
        cluster.stop(control)


def _two_workers(tmp_path, name, overlap, steps=12):
    """Two workers train the digits MLP under BSP in threads; returns worker 0's weights."""
    ds = load_dataset("digits")
    models = [build_model("mlp", ds.input_shape, ds.num_classes, seed=0, hidden=64) for _ in range(2)]
    layout = ParameterLayout.from_module(models[0])
    config = JobConfig.validate_dict({"cluster": {"workers": 2, "servers": 2}, "sync": {"policy": "bsp"},
                                      "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
                                      "progress": False})
    run_dir = tmp_path / name
    run_dir.mkdir()
    cluster = Cluster.start(config, run_dir, layout.shard_bounds(2))
    control = None
    opts = []
    try:
        control, _ = cluster.connect("observer")
        opts = [ParameterServerOptimizer(m, coordinator=cluster.spec.coordinator, token=cluster.token.hex(),
                                         worker=w, overlap=overlap, bucket_mb=0.004) for w, m in enumerate(models)]
        x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
        errors = []

        def run(w):
            try:
                for step in range(steps):
                    take = slice(64 * (2 * step + w), 64 * (2 * step + w + 1))
                    opts[w].zero_grad()
                    torch.nn.functional.cross_entropy(models[w](x[take]), y[take]).backward()
                    opts[w].step()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(w,)) for w in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert all(o.version == steps for o in opts)
        return opts[0]
    finally:
        for o in opts:
            o.close()
        cluster.stop(control)


@pytest.mark.integration
def test_overlapped_training_ends_bit_for_bit_where_unoverlapped_training_does(tmp_path):
    on = _two_workers(tmp_path, "on", overlap=True)
    assert on.overlap is not None and len(on.overlap.buckets) > 2  # several buckets, so parts were sent
    off = _two_workers(tmp_path, "off", overlap=False)
    assert off.overlap is None and off.overlap_off == "turned off"
    assert on.flat.params_np.tobytes() == off.flat.params_np.tobytes()


@pytest.mark.integration
def test_a_second_backward_before_step_is_refused_with_overlap_on(tmp_path):
    ds = load_dataset("digits")
    model = build_model("mlp", ds.input_shape, ds.num_classes, seed=0, hidden=32)
    config = JobConfig.validate_dict({"cluster": {"workers": 1, "servers": 1}, "progress": False})
    cluster = Cluster.start(config, tmp_path, ParameterLayout.from_module(model).shard_bounds(1))
    control = None
    try:
        control, _ = cluster.connect("observer")
        opt = ParameterServerOptimizer(model, coordinator=cluster.spec.coordinator, token=cluster.token.hex(),
                                       worker=0, overlap=True)
        x, y = torch.from_numpy(ds.x_train[:32]), torch.from_numpy(ds.y_train[:32])
        for _ in range(2):  # the first step is not overlapped (it offers the initial weights)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        with pytest.raises(RuntimeError, match="turn overlap off"):
            torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.close()
    finally:
        cluster.stop(control)
