"""The launcher interface: start role processes, learn when they end, end them."""

from __future__ import annotations

import signal
from abc import ABC, abstractmethod
from dataclasses import dataclass

RoleKey = tuple[str, int]  # ("server", 0)


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
    @abstractmethod
    def start(self, role: str, index: int, pass_fds: tuple[int, ...] = ()) -> int:
        """Start a role process; returns its pid."""

    @abstractmethod
    def wait(self, timeout_s: float) -> list[Exit]:
        """Block up to ``timeout_s`` for role exits; returns those that ended."""

    @abstractmethod
    def running(self) -> list[RoleKey]: ...

    @abstractmethod
    def kill(self, role: str, index: int, sig: int = signal.SIGKILL) -> None: ...

    @abstractmethod
    def shutdown(self, grace_s: float = 5.0) -> list[Exit]:
        """Ask every remaining role to stop (SIGTERM), then SIGKILL what is left."""
