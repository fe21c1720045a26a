"""Recovery strategies: how a server's state survives the server.

``checkpoint``: snapshots persisted in the background, restored by a restarted server.
``chain``: K replicas per shard in a chain (strong or relaxed), repaired on failure.
"""

from .checkpoint import CheckpointError, Checkpointer

__all__ = ["CheckpointError", "Checkpointer"]
