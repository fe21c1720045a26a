"""Faults injected on purpose: slow workers (stragglers) and killed roles (kills)."""

from .injector import FaultInjector
from .kills import KillRule, parse_kill
from .stragglers import Straggler, StragglerRule, parse_straggler

__all__ = ["FaultInjector", "KillRule", "Straggler", "StragglerRule", "parse_kill", "parse_straggler"]
