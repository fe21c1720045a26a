"""Metrics: the per-process event log, run summaries, plots and reports."""

from .events import EventLog, read_events

__all__ = ["EventLog", "read_events"]
