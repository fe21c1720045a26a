"""Transports: how frames move. Chosen by name from the configuration."""

from .auth import HANDSHAKE_TIMEOUT_S, AuthError, client_handshake, server_handshake
from .base import Connection, ConnectionClosed, Listener, Transport, split_address
from .frame import NO_WORKER, Flag, Frame, Kind, ProtocolError
from .tcp import TcpTransport

TRANSPORTS = ("tcp", "ltp")


def __getattr__(name: str):
    # LTP (and the NumPy it needs) is imported by whoever uses it, not by every role:
    # the coordinator, which only speaks TCP, starts in half the time without it.
    if name == "LtpTransport":
        from .ltp import LtpTransport
        return LtpTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_transport(name: str, options=None, shm: bool = True) -> Transport:
    """A transport by name; ``options`` is its config section where it has one (LTP's);
    ``shm`` allows shared memory between two ends on one host (TCP's)."""
    if name == "tcp":
        return TcpTransport(options, shm)
    if name == "ltp":
        from .ltp import LtpTransport
        return LtpTransport(options, shm)
    raise ValueError(f"unknown transport {name!r}; choose one of {sorted(TRANSPORTS)}")


def dial(address: str, token: bytes, transport: str = "tcp", timeout: float = 5.0,
         max_payload: int = 0, handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S) -> Connection:
    """Connect and authenticate: the one way every client opens a connection.
    ``timeout`` bounds the connect; ``handshake_timeout_s`` the challenge (5 s by default:
    a peer that accepted may be slow to answer, but a caller may not wait that long)."""
    conn = get_transport(transport).connect(address, timeout=timeout)
    try:
        client_handshake(conn, token, handshake_timeout_s)
    except BaseException:
        conn.close()
        raise
    conn.max_payload = max_payload
    return conn


__all__ = [
    "AuthError", "Connection", "ConnectionClosed", "Flag", "Frame", "Kind", "Listener", "LtpTransport",
    "NO_WORKER", "ProtocolError", "TcpTransport", "Transport", "TRANSPORTS", "dial",
    "get_transport", "server_handshake", "client_handshake", "split_address",
]
