"""A private etcd on loopback, for tests and the control-plane benchmark.

Production jobs point ``control.store`` at an etcd cluster they run themselves; this
starts the ``etcd`` binary (Debian's ``etcd-server`` package) as one member on free
loopback ports, with its data on a temporary directory, and stops it afterwards. Its
election timing is tightened (heartbeat 50 ms, election 500 ms): a single member has no
peers to wait for, and it lets etcd grant the short leases the leader key uses.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from ..transport.base import free_port

START_TIMEOUT_S = 20.0


class EtcdUnavailable(RuntimeError):
    """No etcd binary here, or it would not start; the message says which."""


class LocalEtcd:
    def __init__(self, binary: str | None = None):
        self.binary = binary or shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
        if self.binary is None:
            raise EtcdUnavailable("no etcd binary on PATH (Debian: apt-get install etcd-server)")
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""

    def start(self) -> "LocalEtcd":
        client, peer = free_port(), free_port()
        self.data = tempfile.TemporaryDirectory(prefix="stalwart-etcd-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
        self.log = open(Path(self.data.name) / "etcd.log", "wb")
        self.proc = subprocess.Popen(
            [self.binary, "--name", "stalwart", "--data-dir", str(Path(self.data.name) / "data"),
             "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"stalwart=http://127.0.0.1:{peer}",
             "--heartbeat-interval", "50", "--election-timeout", "500", "--log-level", "warn"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.endpoint = f"etcd://127.0.0.1:{client}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise EtcdUnavailable(f"etcd exited with status {self.proc.returncode} at start")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{client}/health", timeout=1) as reply:
                    if b'"true"' in reply.read():
                        return self
            except OSError:
                pass
            time.sleep(0.1)  # polling its health endpoint, bounded by START_TIMEOUT_S
        self.stop()
        raise EtcdUnavailable(f"etcd did not report healthy within {START_TIMEOUT_S:g}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if getattr(self, "log", None) is not None:
            self.log.close()
        if getattr(self, "data", None) is not None:
            self.data.cleanup()

    def __enter__(self) -> "LocalEtcd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
