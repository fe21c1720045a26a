"""The launcher interface: start role processes, learn when they end, end them."""

from __future__ import annotations

import signal
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from ..spec import RoleSpec

RoleKey = tuple[str, int]  # ("server", 0)


class LaunchError(RuntimeError):
    """A role's process could not be started at all (e.g. a worker command that does not exist)."""


@dataclass
class Exit:
    role: str
    index: int
    pid: int
    returncode: int
    cpu_s: float | None = None        # user + system CPU time of the process, where known
    max_rss_mb: float | None = None   # its peak resident memory, where known

    def describe(self) -> str:
        if self.returncode < 0:
            try:
                how = f"was killed by {signal.Signals(-self.returncode).name}"
            except ValueError:
                how = f"was killed by signal {-self.returncode}"
        else:
            how = f"exited with status {self.returncode}"
        return f"{self.role} {self.index} (pid {self.pid}) {how}"


class Launcher(ABC):
    """Where role processes run, and the one who starts, signals and reaps them.

    The order of use: :meth:`bind_coordinator` for each coordinator process (its listening
    socket is bound where it will run, so the address is known before any process
    exists, and a restarted coordinator gets the same address back), then
    :meth:`use_spec` with the spec that names that address, then :meth:`start` for each
    role; :meth:`shutdown` ends it all, whatever happened.
    """

    @abstractmethod
    def bind_coordinator(self, host: str, index: int = 0) -> str:
        """Bind coordinator ``index``'s listening socket where it will run; returns ``host:port``."""

    @abstractmethod
    def use_spec(self, spec: RoleSpec, path: Path) -> None:
        """The spec every role is started with (saved at ``path`` on this host)."""

    @abstractmethod
    def start(self, role: str, index: int) -> int:
        """Start a role process (again, after a kill); returns its pid. The process finds
        its incarnation (1 at the first start) in ``STALWART_INCARNATION``."""

    @abstractmethod
    def wait(self, timeout_s: float) -> list[Exit]:
        """Block up to ``timeout_s`` for role exits; returns those that ended."""

    @abstractmethod
    def running(self) -> list[RoleKey]: ...

    @abstractmethod
    def kill(self, role: str, index: int, sig: int = signal.SIGKILL) -> None: ...

    def wait_for(self, keys: set[RoleKey], timeout_s: float) -> list[Exit]:
        """Wait until all of ``keys`` have exited or the timeout passes."""
        deadline = time.monotonic() + timeout_s
        exits: list[Exit] = []
        while keys & set(self.running()) and (left := deadline - time.monotonic()) > 0:
            exits += self.wait(left)
        return exits

    def shutdown(self, grace_s: float = 5.0) -> list[Exit]:
        """Ask every remaining role to stop (SIGTERM), then SIGKILL what is left."""
        for key in self.running():
            self.kill(*key, sig=signal.SIGTERM)
        exits = self.wait_for(set(self.running()), grace_s)
        for key in self.running():
            self.kill(*key, sig=signal.SIGKILL)
        exits += self.wait_for(set(self.running()), 5.0)
        self.release()
        return exits

    def output_tail(self, role: str, index: int, lines: int = 12) -> str | None:
        """The last lines a role wrote to stderr, where the launcher can read them."""
        return None

    def describe(self) -> dict:
        """Which launcher, and where it put the roles (for the run's event log)."""
        return {"launcher": "local"}

    def release(self) -> None:
        """Give back what the launcher holds besides processes (a Ray connection, say)."""
