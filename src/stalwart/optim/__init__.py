"""Update rules on flat float32 vectors, without torch: what a server runs on its shard
and what a stateless worker runs alone on its copy, so both live below server and worker."""

from .optimizers import OPTIMIZERS, SGD, Adam, ServerOptimizer, build_optimizer, optimizer_from_config
from .vector import all_finite, axpy

__all__ = ["Adam", "OPTIMIZERS", "SGD", "ServerOptimizer", "all_finite", "axpy", "build_optimizer",
           "optimizer_from_config"]
