"""The server role: one shard of parameters, its optimizer and its synchronization gate."""

from .optim import OPTIMIZERS, Adam, SGD, ServerOptimizer, build_optimizer
from .server import ParameterServer

__all__ = ["Adam", "OPTIMIZERS", "ParameterServer", "SGD", "ServerOptimizer", "build_optimizer"]
