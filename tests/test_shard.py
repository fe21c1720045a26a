"""A shard's state: one apply per log entry, one snapshot format, restored exactly."""

import hashlib

import numpy as np
import pytest

from stalwart.metrics import EventLog
from stalwart.optim import build_optimizer
from stalwart.shard import ShardState, Snapshot, SnapshotError
from stalwart.sync import parse_policy

SIZE = 16


def shard(index=0, optimizer="adam", policy="bsp"):
    return ShardState(index, SIZE, build_optimizer(optimizer, SIZE, lr=0.01), parse_policy(policy)(2, SIZE), 2,
                      EventLog(None, "server"))


def trained():
    s = shard()
    rng = np.random.default_rng(0)
    with s.lock:
        s.apply_init(0, rng.standard_normal(SIZE).astype(np.float32))
        for clock in range(3):
            for worker in (0, 1):
                s.apply_push(worker, clock, rng.standard_normal(SIZE).astype(np.float32), now=float(clock))
        s.apply_push(0, 3, np.ones(SIZE, np.float32), now=3.0)  # half a barrier: held in the policy's sum
    return s


def test_a_restored_snapshot_is_the_same_state_bit_for_bit():
    source, target = trained(), shard()
    assert source.version == 3
    with source.lock, target.lock:
        target.restore(Snapshot.decode(source.snapshot().to_bytes(), shard=0))
    np.testing.assert_array_equal(target.params, source.params)
    for k, v in source.optimizer.state_dict().items():
        np.testing.assert_array_equal(target.optimizer.state_dict()[k], v)
    assert (target.version, target.initialized) == (3, True)
    # the half-collected barrier came along: worker 1's push completes it on the copy as on the source
    grad = np.full(SIZE, 3.0, np.float32)
    with source.lock, target.lock:
        assert source.apply_push(1, 3, grad, 4.0) == target.apply_push(1, 3, grad, 4.0) == 4
    np.testing.assert_array_equal(target.params, source.params)


def test_a_checkpoint_snapshot_leaves_the_policy_as_it_is():
    source, target = trained(), shard()
    with source.lock, target.lock:
        snap = source.snapshot(policy=False)
        assert not any(k.startswith("policy.") for k in snap.arrays) and "policy" not in snap.scalars
        target.restore(snap)
    assert target.version == 3 and target.policy.clock == 0 and not target.policy.synced  # follows the workers


def test_a_snapshot_of_another_shard_or_size_is_refused_by_name():
    source = trained()
    with source.lock:
        snap = source.snapshot()
    other = shard(index=1)
    with other.lock, pytest.raises(SnapshotError, match="state of shard 0 cannot be installed into shard 1"):
        other.restore(snap)
    small = ShardState(0, SIZE // 2, build_optimizer("adam", SIZE // 2, lr=0.01), parse_policy("bsp")(2, SIZE // 2),
                       2, EventLog(None, "server"))
    with small.lock, pytest.raises(SnapshotError, match="parameters; shard 0 holds"):
        small.restore(snap)
    assert small.version == 0 and not small.initialized  # refused before anything changed


def test_bytes_with_a_valid_checksum_but_no_snapshot_in_them_are_refused():
    raw = Snapshot(0, 1, True, {"params": np.zeros(4, np.float32)}).to_bytes()
    forged = b"NOTSNAPS" + raw[8:-32]
    with pytest.raises(SnapshotError, match="bad magic"):
        Snapshot.decode(forged + hashlib.sha256(forged).digest())
