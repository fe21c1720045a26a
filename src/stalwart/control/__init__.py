"""The control plane: membership, leases, the shard map and the job's state."""

from .client import CoordinatorClient, CoordinatorError
from .coordinator import Coordinator

__all__ = ["Coordinator", "CoordinatorClient", "CoordinatorError"]
