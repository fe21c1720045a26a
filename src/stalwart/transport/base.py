"""The transport interface: how frames move between two processes.

In the spirit of ps-lite's ``Van``, a transport is small: ``listen`` and ``connect``
produce :class:`Connection` objects, and a connection ``send``s and ``recv``s frames.
Authentication (:mod:`stalwart.transport.auth`) and retransmission live above this
layer, so every transport (TCP with its shared-memory path, and LTP's UDP pushes beside
a TCP stream) gets them for free.
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from typing import Callable

from .frame import Frame


class Borrow:
    """What a :data:`PayloadSink` returns to take a payload where it already lies.

    Where the payload sits in memory both ends map (a shared-memory segment), the frame's
    payload is a read-only view of it, with no copy, and it stays valid until the next
    ``recv`` on that connection (or its ``close``), when the sender may reuse the memory.
    Anywhere else it is received into ``fallback``, as a plain sink's buffer would be.
    A server that is done with a push before it reads the next frame (it applies the
    gradient, and whatever keeps a log copies it) can so apply a gradient straight from
    the segment."""

    __slots__ = ("fallback",)

    def __init__(self, fallback: memoryview):
        self.fallback = fallback


# Given a received header, return a writable buffer of exactly ``payload_len`` bytes
# to place the payload in (zero-copy), a :class:`Borrow`, or None to have a fresh
# buffer allocated.
PayloadSink = Callable[[Frame], "memoryview | Borrow | None"]


class ConnectionClosed(ConnectionError):
    """The peer went away (cleanly or not)."""


class Connection(ABC):
    #: Largest payload this end accepts; raised after authentication by whoever owns it.
    max_payload: int = 0
    peer: str = "?"

    @abstractmethod
    def send(self, frame: Frame, payload: memoryview | bytes | None = None) -> None:
        """Send one frame; the payload is read from the caller's buffer, not copied."""

    @abstractmethod
    def recv(self, sink: PayloadSink | None = None) -> Frame:
        """Receive one frame; raises ProtocolError on malformed input, ConnectionClosed on EOF."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def settimeout(self, seconds: float | None) -> None: ...

    @abstractmethod
    def fileno(self) -> int:
        """The descriptor that turns readable when a frame (or the peer's going away)
        arrives, so that a caller can wait on several connections at once."""

    def bytes_moved(self) -> dict[str, int]:
        """Payload bytes this end has sent and received, by the path they took
        (``tcp``, ``shm``, ``ltp``): what a job's summary reports as where its bytes went."""
        return {}

    def capabilities(self) -> dict:
        """What this end offers its peer, stated during authentication (e.g. a host
        identity for shared memory)."""
        return {}

    def negotiated(self, peer: dict) -> None:
        """Authentication succeeded and the peer offered ``peer``: switch on what both support."""


class Listener(ABC):
    address: str

    @abstractmethod
    def accept(self) -> Connection:
        """Next incoming connection, not yet authenticated."""

    @abstractmethod
    def close(self) -> None: ...


class Transport(ABC):
    name: str

    def __init__(self, options=None, shm: bool = True):
        self.options = options
        self.shm = shm  # may payloads between two ends on one host go through shared memory?

    @abstractmethod
    def listen(self, host: str, port: int = 0) -> Listener: ...

    @abstractmethod
    def connect(self, address: str, timeout: float = 5.0) -> Connection:
        """A connection to ``host:port``, not yet authenticated."""


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not of the form host:port")
    return host.strip("[]"), int(port)


def answers(address: str, timeout_s: float = 0.2) -> bool:
    """Does anything accept a TCP connection at ``address``? A SIGKILLed process does
    not: the kernel refuses at once. The probe behind every "is it really dead?"."""
    try:
        socket.create_connection(split_address(address), timeout=timeout_s).close()
        return True
    except (OSError, ValueError):
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now, for a process that binds it itself later
    (etcd, torch.distributed's rendezvous), where handing down a socket is not an option."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
