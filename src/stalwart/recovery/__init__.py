"""Recovery strategies: how a server's state survives the server."""

from .checkpoint import CheckpointError, Checkpointer

__all__ = ["CheckpointError", "Checkpointer"]
