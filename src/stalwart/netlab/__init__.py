"""Emulated networks for experiments: namespaces, veth pairs, a bridge, a bottleneck."""

from .lab import Host, NetLab, NetLabError, cleanup_leftovers, unavailable_reason

__all__ = ["Host", "NetLab", "NetLabError", "cleanup_leftovers", "unavailable_reason"]
