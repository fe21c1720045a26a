"""stalwart: a parameter-server training system for PyTorch that keeps training through
server failures, stragglers and lossy networks.

The public API is imported lazily so that processes which never touch torch (servers,
the coordinator) do not pay for importing it.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "JobConfig": ("stalwart.config", "JobConfig"),
    "ConfigError": ("stalwart.config", "ConfigError"),
    "Job": ("stalwart.launch.job", "Job"),
    "JobFailed": ("stalwart.launch.driver", "JobFailed"),
    "ParameterServerOptimizer": ("stalwart.worker.optimizer", "ParameterServerOptimizer"),
    "ParameterClient": ("stalwart.worker.client", "ParameterClient"),
    "JobStopping": ("stalwart.worker.client", "JobStopping"),
    "NotInJob": ("stalwart.worker.session", "NotInJob"),
    # the few calls of a script run by `stalwart run` (see stalwart.api)
    "worker_index": ("stalwart.api", "worker_index"),
    "num_workers": ("stalwart.api", "num_workers"),
    "shard": ("stalwart.api", "shard"),
    "log": ("stalwart.api", "log"),
    "join": ("stalwart.api", "join"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'stalwart' has no attribute {name!r}")


__all__ = list(_LAZY)
