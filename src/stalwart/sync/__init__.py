"""Synchronization policies, chosen by a short spec string.

========================  =====================================================
``bsp``                   one barrier per clock; the mean of all pushes applied
``asp``                   every push applied at once; nobody waits
``ssp:S``                 no worker more than S clocks ahead of the slowest
``dssp:S:R``              like ssp, the bound moving within [S, S+R] by speed
``elastic:R:N``           ElasticBSP: barriers placed by ZipLine over R predicted pushes,
                          each worker's interval the latest (N = 1) or a mean of span N
========================  =====================================================

Parameters may be left out for their defaults (``ssp`` = ``ssp:3``, ``dssp`` =
``dssp:3:3``, ``elastic`` = ``elastic:15:1``). :func:`zipline` is usable on its own.
"""

from __future__ import annotations

from typing import Callable

from .asp import ASP
from .base import SyncError, SyncPolicy
from .bsp import BSP
from .dssp import DSSP
from .elastic import ElasticBSP
from .ssp import SSP
from .zipline import zipline

PolicyFactory = Callable[..., SyncPolicy]

# name -> (class, names of its integer parameters, their defaults)
_POLICIES: dict[str, tuple[type[SyncPolicy], tuple[str, ...], tuple[int, ...]]] = {
    "bsp": (BSP, (), ()),
    "asp": (ASP, (), ()),
    "ssp": (SSP, ("staleness",), (3,)),
    "dssp": (DSSP, ("staleness", "extra"), (3, 3)),
    "elastic": (ElasticBSP, ("lookahead", "span"), (15, 1)),
}


def parse_policy(spec: str) -> PolicyFactory:
    """Turn ``"ssp:3"`` etc. into a factory ``(workers, shard_size, leader=True) -> SyncPolicy``."""
    name, *args = spec.strip().lower().split(":")
    if name not in _POLICIES:
        raise ValueError(f"unknown sync policy {spec!r}; choose one of {sorted(_POLICIES)}")
    cls, names, defaults = _POLICIES[name]
    if len(args) > len(names):
        usage = ":".join([name, *(n.upper() for n in names)])
        raise ValueError(f"sync policy {spec!r} has too many parameters; use {usage}"
                         if names else f"sync policy {name!r} takes no parameters, got {spec!r}")
    values = list(defaults)
    for i, raw in enumerate(args):
        try:
            values[i] = int(raw)
        except ValueError:
            raise ValueError(f"sync policy {spec!r}: {names[i]} must be an integer, got {raw!r}") from None
        least = 1 if names[i] in ("lookahead", "span") else 0
        if values[i] < least:
            raise ValueError(f"sync policy {spec!r}: {names[i]} must be >= {least}, got {values[i]}")
    params = dict(zip(names, values))
    return lambda workers, shard_size, leader=True: cls(workers, shard_size, leader, **params)


__all__ = ["ASP", "BSP", "DSSP", "ElasticBSP", "SSP", "SyncError", "SyncPolicy", "parse_policy", "zipline"]
