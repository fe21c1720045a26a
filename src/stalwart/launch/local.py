"""Roles as local OS processes: the embedded default.

Each role is ``python -m stalwart.launch.role ...`` in a session of its own (so a
Ctrl-C reaches only the launcher, which then stops the job in order) with
``PR_SET_PDEATHSIG`` set, so that no role outlives a launcher that is itself killed.
Exits are watched through pidfds: the launcher sleeps in ``poll`` until a process
really ends, rather than polling on a timer.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

from .base import Exit, Launcher, RoleKey
from ..spec import HOST_ENV, LISTEN_FD_ENV, RoleSpec

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class LocalLauncher(Launcher):
    def __init__(self, run_dir: Path, env: dict[str, str], placement: dict[str, dict] | None = None):
        self.run_dir = run_dir
        self.spec_path: Path | None = None
        self.env = {**os.environ, **env}
        self.placement = placement or {}
        self.procs: dict[RoleKey, subprocess.Popen] = {}
        self._pidfds: dict[int, RoleKey] = {}
        self._poll = select.poll()
        self._coordinator_socket: socket.socket | None = None
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)

    def bind_coordinator(self, host: str) -> str:
        self._coordinator_socket = socket.create_server((host, 0))
        host, port = self._coordinator_socket.getsockname()[:2]
        return f"{host}:{port}"

    def use_spec(self, spec: RoleSpec, path: Path) -> None:
        self.spec_path = path

    def start(self, role: str, index: int) -> int:
        if self.spec_path is None:
            raise RuntimeError("use_spec() comes before start()")
        out = open(self.run_dir / "logs" / f"{role}-{index}.log", "ab")
        argv = [sys.executable, "-m", "stalwart.launch.role", role, str(index), str(self.spec_path)]
        env, pass_fds = self.env, ()
        if role == "coordinator" and (listen := self._coordinator_socket) is not None:
            listen.set_inheritable(True)
            env, pass_fds = {**env, LISTEN_FD_ENV: str(listen.fileno())}, (listen.fileno(),)
        if (place := self.placement.get(f"{role}:{index}")) is not None:
            # A host of its own (a netlab namespace): `ip netns exec` execs in place, so the
            # pid, the pidfd and the death signal are the role's own.
            argv = ["ip", "netns", "exec", place["netns"], *argv]
            env = {**env, HOST_ENV: place["host"]}
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            pass_fds=pass_fds, start_new_session=True, preexec_fn=_die_with_parent)
        out.close()
        if pass_fds:
            self._coordinator_socket.close()  # the coordinator holds it now
            self._coordinator_socket = None
        self.procs[(role, index)] = proc
        fd = os.pidfd_open(proc.pid)
        self._pidfds[fd] = (role, index)
        self._poll.register(fd, select.POLLIN)
        return proc.pid

    def wait(self, timeout_s: float) -> list[Exit]:
        exits = []
        for fd, _ in self._poll.poll(max(0, int(timeout_s * 1000))):
            key = self._pidfds.pop(fd)
            self._poll.unregister(fd)
            os.close(fd)
            proc = self.procs.pop(key)
            # Reap it ourselves: wait4 also gives the process's CPU time and peak memory.
            # (Nothing else reaps our children: kill() signals by pid, not through Popen,
            # whose send_signal would reap an exited child first and lose its usage.)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            exits.append(Exit(key[0], key[1], proc.pid, proc.returncode, cpu_s=usage.ru_utime + usage.ru_stime,
                              max_rss_mb=usage.ru_maxrss / 1024))
        return exits

    def running(self) -> list[RoleKey]:
        return list(self.procs)

    def kill(self, role: str, index: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.get((role, index))
        if proc is not None:
            try:
                # Safe by pid: an exited child stays a zombie (its pid not reused) until
                # wait() reaps it.
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass

    def release(self) -> None:
        if self._coordinator_socket is not None:
            self._coordinator_socket.close()
            self._coordinator_socket = None
