"""The control plane: membership, leases, the shard map and the job's state."""

from .client import CoordinatorClient, CoordinatorError, CoordinatorUnavailable
from .coordinator import Coordinator
from .store import ControlStore, EtcdStore, MemoryStore

__all__ = ["Coordinator", "CoordinatorClient", "CoordinatorError", "CoordinatorUnavailable",
           "ControlStore", "EtcdStore", "MemoryStore"]
