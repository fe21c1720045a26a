"""A role's handle on the coordinator: requests, and heartbeats in the background."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

from ..transport import ConnectionClosed, Frame, Kind, ProtocolError, dial


class CoordinatorError(RuntimeError):
    """The coordinator refused a request or could not be reached."""


class CoordinatorClient:
    def __init__(self, address: str, token: bytes, role: str, index: int, timeout: float = 10.0):
        self.address, self.role, self.index = address, role, index
        try:
            self._conn = dial(address, token, timeout=timeout)
        except (OSError, ProtocolError) as exc:
            raise CoordinatorError(f"cannot reach the coordinator at {address}: {exc}") from None
        self._lock = threading.Lock()
        self.state = "running"
        self.epoch = 0
        self._beat: threading.Thread | None = None
        self._closed = threading.Event()
        self.lost = threading.Event()
        self.tails: list[str] = []

    def call(self, op: str, **args: Any) -> dict:
        with self._lock:
            try:
                self._conn.send(Frame(Kind.REQUEST, meta={"op": op, **args}))
                reply = self._conn.recv()
            except (OSError, ConnectionClosed, ProtocolError) as exc:
                self.lost.set()
                raise CoordinatorError(f"coordinator at {self.address} is gone: {exc}") from None
        if reply.kind != Kind.REPLY or reply.meta is None:
            raise CoordinatorError(f"coordinator answered {op!r} with {reply.kind.name}")
        if "error" in reply.meta:
            raise CoordinatorError(f"coordinator refused {op!r}: {reply.meta['error']}")
        self.state = reply.meta.get("state", self.state)
        self.epoch = reply.meta.get("epoch", self.epoch)
        return reply.meta

    def register(self, address: str | None = None) -> dict:
        return self.call("register", role=self.role, index=self.index, address=address, pid=os.getpid())

    def shard_map(self, timeout_s: float = 60.0) -> list[str]:
        """Where to push, per shard (a chain's head); ``self.tails``: where to pull."""
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self.call("shard_map", wait_s=max(0.0, min(5.0, deadline - time.monotonic())))
            if reply["ready"]:
                self.tails = list(reply.get("tails", reply["shards"]))
                return list(reply["shards"])
            if reply["state"] != "running" or time.monotonic() >= deadline:
                raise CoordinatorError(f"no complete shard map within {timeout_s}s "
                                       f"(job state {reply['state']})")

    def relocate(self, failed: list[str], timeout_s: float = 1.0) -> tuple[list[str], list[str]]:
        """Report servers whose connections broke, then read where each shard is now.

        To the data plane a shard that cannot be located yet is a connection that cannot
        be made: every failure here is a ``ConnectionError``, which its callers retry."""
        try:
            for address in failed:
                self.call("suspect", address=address, reporter=f"{self.role} {self.index}")
            heads = self.shard_map(timeout_s)
        except CoordinatorError as exc:
            raise ConnectionError(str(exc)) from None
        return heads, self.tails

    def start_heartbeats(self, interval_s: float, stats: Callable[[], dict] | None = None,
                         on_state: Callable[[str], None] | None = None) -> None:
        """Renew this member's lease every interval; report job-state changes."""

        def beat() -> None:
            while not self._closed.wait(interval_s):
                try:
                    reply = self.call("heartbeat", role=self.role, index=self.index,
                                      stats=stats() if stats else None)
                except CoordinatorError:
                    return
                if on_state is not None:
                    on_state(reply["state"])

        self._beat = threading.Thread(target=beat, name="heartbeat", daemon=True)
        self._beat.start()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._conn.close()
