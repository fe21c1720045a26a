"""Launchers: start the job's roles as processes and watch them."""

from .base import Exit, Launcher
from .job import Job, JobFailed
from .local import LocalLauncher

__all__ = ["Exit", "Job", "JobFailed", "Launcher", "LocalLauncher"]
