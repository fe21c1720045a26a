"""The server role: the wire in front of one shard (its state is :mod:`stalwart.shard`,
its survival a :mod:`stalwart.recovery` strategy)."""

from .server import ParameterServer

__all__ = ["ParameterServer"]
