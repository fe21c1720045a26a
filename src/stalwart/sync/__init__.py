"""Synchronization policies, chosen by a short spec string: ``bsp``, ``asp``."""

from __future__ import annotations

from typing import Callable

from .asp import ASP
from .base import SyncError, SyncPolicy
from .bsp import BSP

PolicyFactory = Callable[[int, int], SyncPolicy]

_POLICIES: dict[str, type[SyncPolicy]] = {"bsp": BSP, "asp": ASP}


def parse_policy(spec: str) -> PolicyFactory:
    """Turn ``"bsp"`` etc. into a factory ``(workers, shard_size) -> SyncPolicy``."""
    name, *args = spec.strip().lower().split(":")
    if name not in _POLICIES:
        raise ValueError(f"unknown sync policy {spec!r}; choose one of {sorted(_POLICIES)}")
    if args:
        raise ValueError(f"sync policy {name!r} takes no parameters, got {spec!r}")
    cls = _POLICIES[name]
    return lambda workers, shard_size: cls(workers, shard_size)


__all__ = ["ASP", "BSP", "SyncError", "SyncPolicy", "parse_policy"]
