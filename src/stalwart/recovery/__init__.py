"""Recovery strategies: how a server's state survives the server.

Each is a :class:`RecoveryStrategy` (the hooks a server calls, :mod:`.base`):
``none`` (the base: a dead server ends the job), ``checkpoint`` (snapshots persisted
in the background, restored by a restarted server), ``chain`` (K replicas per shard in
a chain, strong or relaxed, repaired on failure) and ``stateless`` (workers train
through the outage and rebuild the server from their copies).
"""

from .base import Entry, Op, RecoveryStrategy
from .checkpoint import CheckpointRecovery, Checkpointer

__all__ = ["CheckpointRecovery", "Checkpointer", "Entry", "Op", "RecoveryStrategy"]
