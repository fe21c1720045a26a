"""Checkpoint files: atomic, checksummed, versioned; bad ones detected and skipped."""

import numpy as np
import pytest

from stalwart.metrics import EventLog
from stalwart.recovery import Checkpointer
from stalwart.shard import Snapshot, SnapshotError

from helpers import events


def state(value, size=8, version=5, shard=0, steps=7):
    return Snapshot(shard, version, True, {"params": np.full(size, value, np.float32),
                                           "opt.buf": np.full(size, -value, np.float32)},
                    {"optimizer": {"steps": steps}})


def raw(shard=0, version=5, value=1.0):
    return state(value, version=version, shard=shard).to_bytes()


def test_roundtrip():
    snap = Snapshot.decode(raw(version=42, value=3.0), shard=0)
    assert snap.version == 42 and snap.scalars == {"optimizer": {"steps": 7}} and snap.initialized
    np.testing.assert_array_equal(snap.arrays["params"], np.full(8, 3.0, np.float32))
    np.testing.assert_array_equal(snap.arrays["opt.buf"], np.full(8, -3.0, np.float32))
    assert snap.section("opt") == {"steps": 7, "buf": snap.arrays["opt.buf"]} and snap.section("policy") is None


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-1], "checksum mismatch"),
    (lambda b: b[:80], "checksum mismatch"),
    (lambda b: b[:40], "truncated"),
    (lambda b: b[:60] + bytes([b[60] ^ 0xFF]) + b[61:], "checksum mismatch"),
])
def test_damaged_files_are_refused(damage, message):
    with pytest.raises(SnapshotError, match=message):
        Snapshot.decode(damage(raw()), shard=0)


def test_a_file_of_another_shard_is_refused():
    with pytest.raises(SnapshotError, match="holds shard 1, not shard 0"):
        Snapshot.decode(raw(shard=1), shard=0)


def make(tmp_path, keep=2):
    log = EventLog.for_role(tmp_path, "server", 0)
    return Checkpointer(tmp_path / "ckpt", 0, log, every_updates=10, every_s=None, keep=keep), log


def test_snapshots_are_persisted_keeping_the_last_few(tmp_path):
    ck, _ = make(tmp_path, keep=2)
    live = state(1.0)
    for version in (10, 20, 30):
        assert ck.due(version)
        live.arrays["params"][:] = version
        live.version, live.scalars = version, {"optimizer": {"steps": version}}
        ck.snapshot(live)
        assert ck.flush()  # each one on disk before the next, so each gets a file
        assert not ck.due(version + 5)
    ck.close()
    assert [p.name for p in ck.files()] == ["shard0-v000000000030.ckpt", "shard0-v000000000020.ckpt"]
    assert not list((tmp_path / "ckpt").glob("*.tmp*"))
    newest = ck.load_newest()
    assert newest.version == 30 and newest.scalars == {"optimizer": {"steps": 30}}
    np.testing.assert_array_equal(newest.arrays["params"], np.full(8, 30.0, np.float32))


def test_a_snapshot_is_a_copy(tmp_path):
    ck, _ = make(tmp_path)
    live = state(1.0, version=10)
    ck.snapshot(live)
    live.arrays["params"][:] = 99.0  # training goes on while the file is written
    ck.close(flush=True)
    np.testing.assert_array_equal(ck.load_newest().arrays["params"], np.full(8, 1.0, np.float32))


def test_a_corrupted_newest_file_is_skipped_for_the_one_before(tmp_path):
    ck, log = make(tmp_path, keep=3)
    ck.snapshot(state(1.0, version=10))
    assert ck.flush()
    ck.snapshot(state(2.0, version=20))
    ck.close(flush=True)
    newest = ck.files()[0]
    newest.write_bytes(newest.read_bytes()[:-100])  # a torn write
    assert ck.load_newest().version == 10
    log.close()
    (skipped,) = events(tmp_path, "checkpoint_skipped")
    assert skipped["path"] == newest.name and "checksum" in skipped["reason"]
