"""The worker role and the client side of the data plane."""

from .client import JobStopping, ParameterClient, ServerError
from .optimizer import ParameterServerOptimizer

__all__ = ["JobStopping", "ParameterClient", "ParameterServerOptimizer", "ServerError"]
