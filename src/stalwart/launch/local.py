"""Roles as local OS processes: the embedded default.

Each role is ``python -m stalwart.launch.role ...`` in a session of its own (so a
Ctrl-C reaches only the launcher, which then stops the job in order) with
``PR_SET_PDEATHSIG`` set, so that no role outlives a launcher that is itself killed.
Exits are watched through pidfds: the launcher sleeps in ``poll`` until a process
really ends, rather than polling on a timer.

A job with a worker command (``stalwart run -- COMMAND``) runs that command as each
worker's process instead, with the spec's path and the worker's index in its
environment (``STALWART_SPEC``, ``STALWART_WORKER``, beside the token), its stdout in
``logs/worker-N.log`` and its stderr apart in ``logs/worker-N.err``, whose last lines
name what went wrong when the command fails (:meth:`LocalLauncher.output_tail`).
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

from .base import Exit, LaunchError, Launcher, RoleKey
from ..control.store import INCARNATION_ENV
from ..spec import HOST_ENV, LISTEN_FD_ENV, RoleSpec, worker_env

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
        self.command: list[str] = []  # the workers' command, when a script is the worker
        self.workdir: str | None = None  # ...and the folder it runs in
        self.env = {**os.environ, **env}
        self.placement = placement or {}
        self.procs: dict[RoleKey, subprocess.Popen] = {}
        self._pidfds: dict[int, RoleKey] = {}
        self._poll = select.poll()
        self._coordinator_sockets: dict[int, socket.socket] = {}  # bound, not yet handed down
        self._coordinator_addresses: dict[int, tuple[str, int]] = {}
        self.starts: dict[RoleKey, int] = {}
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)

    def bind_coordinator(self, host: str, index: int = 0) -> str:
        host, port = self._bind(index, (host, 0))
        return f"{host}:{port}"

    def _bind(self, index: int, address: tuple[str, int]) -> tuple[str, int]:
        # A restart binds the same port again (create_server sets SO_REUSEADDR): the
        # roles keep dialling the address they were given.
        listen = socket.create_server(address)
        self._coordinator_sockets[index] = listen
        self._coordinator_addresses[index] = listen.getsockname()[:2]
        return self._coordinator_addresses[index]

    def use_spec(self, spec: RoleSpec, path: Path) -> None:
        self.spec_path = path
        self.command = list(spec.config.get("command") or [])
        self.workdir = spec.workdir or None

    def output_tail(self, role: str, index: int, lines: int = 12) -> str | None:
        """The last lines a role wrote to its stderr (a command worker's own file; the
        log, which holds both streams, for the others)."""
        for name in (f"{role}-{index}.err", f"{role}-{index}.log"):
            path = self.run_dir / "logs" / name
            if path.is_file():
                with open(path, "rb") as f:
                    f.seek(max(0, path.stat().st_size - 8192))
                    text = f.read().decode("utf-8", errors="replace")
                return "\n".join(text.rstrip().splitlines()[-lines:])
        return None

    def start(self, role: str, index: int) -> int:
        if self.spec_path is None:
            raise RuntimeError("use_spec() comes before start()")
        out = open(self.run_dir / "logs" / f"{role}-{index}.log", "ab")
        argv = [sys.executable, "-m", "stalwart.launch.role", role, str(index), str(self.spec_path)]
        self.starts[(role, index)] = self.starts.get((role, index), 0) + 1
        env, pass_fds = {**self.env, INCARNATION_ENV: str(self.starts[(role, index)])}, ()
        errors, cwd = subprocess.STDOUT, None
        if role == "worker" and self.command:
            cwd = self.workdir
            argv = list(self.command)
            env = {**env, **worker_env(self.spec_path, index)}
            errors = open(self.run_dir / "logs" / f"{role}-{index}.err", "ab")
        if role == "coordinator":
            if index not in self._coordinator_sockets and index in self._coordinator_addresses:
                self._bind(index, self._coordinator_addresses[index])
            if (listen := self._coordinator_sockets.get(index)) is not None:
                listen.set_inheritable(True)
                env, pass_fds = {**env, LISTEN_FD_ENV: str(listen.fileno())}, (listen.fileno(),)
        if (place := self.placement.get(f"{role}:{index}")) is not None:
            # A host of its own (a netlab namespace): `ip netns exec` execs in place, so the
            # pid, the pidfd and the death signal are the role's own.
            argv = ["ip", "netns", "exec", place["netns"], *argv]
            env = {**env, HOST_ENV: place["host"]}
        try:
            proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=errors, stdin=subprocess.DEVNULL, cwd=cwd,
                pass_fds=pass_fds, start_new_session=True, preexec_fn=_die_with_parent)
        except OSError as exc:  # a command that does not exist, or cannot be run
            raise LaunchError(f"cannot start {role} {index} as {' '.join(argv)!r}: {exc.strerror or exc}") from None
        finally:
            out.close()
            if errors is not subprocess.STDOUT:
                errors.close()
        if pass_fds:
            # The coordinator holds it now; with ours closed, a dead coordinator's port
            # refuses connections at once instead of queueing them unanswered.
            self._coordinator_sockets.pop(index).close()
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
        for listen in self._coordinator_sockets.values():
            listen.close()
        self._coordinator_sockets.clear()
