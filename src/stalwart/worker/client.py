"""The data-plane client: one authenticated connection per shard, push and pull.

Requests to all shards go out before any reply is read, so the shards work in
parallel without a thread per shard. Payloads are sent from, and received into, the
caller's flat buffers (slices of one vector), so parameters land directly in the
model's own storage.
"""

from __future__ import annotations

import numpy as np

from ..transport import NO_WORKER, Connection, Flag, Frame, Kind, ProtocolError, dial


class ServerError(RuntimeError):
    """A server refused a request; the message carries its reason."""


class JobStopping(Exception):
    """The servers say the job is stopping: finish up, do not wait for more."""


class ParameterClient:
    def __init__(self, shards: list[str], bounds: list[int], token: bytes, *,
                 worker: int = NO_WORKER, transport: str = "tcp", timeout: float = 10.0):
        if len(bounds) != len(shards) + 1:
            raise ValueError(f"{len(shards)} shards need {len(shards) + 1} bounds, got {len(bounds)}")
        self.worker, self.bounds = worker, bounds
        self.conns: list[Connection] = []
        try:
            for s, address in enumerate(shards):
                self.conns.append(dial(address, token, transport, timeout,
                                       max_payload=(bounds[s + 1] - bounds[s]) * 4))
        except BaseException:
            self.close()
            raise
        self.versions = [0] * len(shards)
        self.bytes_pushed = 0
        self.bytes_pulled = 0
        self.seq = 0
        # What the sync leader asked this worker to relay to every shard (see
        # stalwart.sync.base): taken from push acknowledgements, sent with pulls.
        self.hint: dict | None = None

    @property
    def shards(self) -> int:
        return len(self.conns)

    def _views(self, flat: np.ndarray) -> list[memoryview]:
        if flat.dtype != np.float32 or flat.ndim != 1 or flat.size != self.bounds[-1]:
            raise ValueError(f"expected a flat float32 vector of {self.bounds[-1]} values, "
                             f"got {flat.dtype} {flat.shape}")
        return [memoryview(flat[self.bounds[s]:self.bounds[s + 1]]).cast("B") for s in range(self.shards)]

    def _recv(self, s: int, expect: Kind, into: memoryview | None = None) -> Frame:
        frame = self.conns[s].recv(None if into is None else (lambda f: into))
        if frame.kind == Kind.STOP:
            raise JobStopping()
        if frame.kind == Kind.ERROR:
            raise ServerError(f"shard {s}: {(frame.meta or {}).get('reason', 'unspecified error')}")
        if frame.kind != expect:
            raise ProtocolError(f"shard {s} answered {frame.kind.name}, expected {expect.name}")
        return frame

    def init(self, params: np.ndarray) -> None:
        """Offer initial parameters; each shard keeps the first offer it gets."""
        for s, view in enumerate(self._views(params)):
            self.conns[s].send(Frame(Kind.INIT, shard=s, worker=self.worker), view)
        for s in range(self.shards):
            self._recv(s, Kind.PUSH_ACK)

    def push_pull(self, grad: np.ndarray | None, params: np.ndarray | None, clock: int,
                  wait: bool = True) -> list[int]:
        """Push ``grad`` for ``clock`` and/or pull into ``params``; returns shard versions.

        With ``wait`` the pull waits at each shard's sync gate for ``clock``; without, it
        returns the latest parameters at once.
        """
        grads = self._views(grad) if grad is not None else None
        targets = self._views(params) if params is not None else None
        self.seq += 1
        pull_meta = {"hint": self.hint} if self.hint is not None and wait else None
        for s, conn in enumerate(self.conns):
            if grads is not None:
                conn.send(Frame(Kind.PUSH, shard=s, worker=self.worker, seq=self.seq, clock=clock), grads[s])
            if targets is not None:
                conn.send(Frame(Kind.PULL, shard=s, worker=self.worker, seq=self.seq, clock=clock,
                                flags=0 if wait else Flag.ASYNC_PULL, meta=pull_meta))
        hint = None
        for s in range(self.shards):
            if grads is not None:
                ack = self._recv(s, Kind.PUSH_ACK)
                self.versions[s] = ack.clock
                hint = (ack.meta or {}).get("hint", hint)
                self.bytes_pushed += grads[s].nbytes
            if targets is not None:
                self.versions[s] = self._recv(s, Kind.PARAMS, targets[s]).clock
                self.bytes_pulled += targets[s].nbytes
        if grads is not None:
            self.hint = hint
        return list(self.versions)

    def push(self, grad: np.ndarray, clock: int) -> list[int]:
        return self.push_pull(grad, None, clock)

    def pull(self, params: np.ndarray, clock: int = 0, wait: bool = True) -> list[int]:
        return self.push_pull(None, params, clock, wait)

    def leave(self) -> None:
        """Tell every shard this worker is done, so that no barrier waits for it."""
        for s, conn in enumerate(self.conns):
            conn.send(Frame(Kind.DONE, shard=s, worker=self.worker))
        for s in range(self.shards):
            try:
                self._recv(s, Kind.PUSH_ACK)
            except JobStopping:
                pass

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.conns = []
