"""A shard's state: parameters, version, optimizer and sync policy, one apply per log
entry, and one snapshot format. Below the server and the recovery strategies, which
both act on a shard through it."""

from .rwlock import ReadWriteLock
from .snapshot import Snapshot, SnapshotError
from .state import ShardState

__all__ = ["ReadWriteLock", "ShardState", "Snapshot", "SnapshotError"]
