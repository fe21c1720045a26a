"""Faults injected on purpose: slow workers now; kills and restarts build on this package."""

from .stragglers import Straggler, StragglerRule, parse_straggler

__all__ = ["Straggler", "StragglerRule", "parse_straggler"]
