"""Mutual HMAC challenge-response: every connection proves it belongs to the job.

The server sends a fresh nonce; the client answers with its own nonce and
HMAC-SHA256(token, "client" | server_nonce | client_nonce); the server checks it and
proves itself in turn with HMAC(token, "server" | client_nonce | server_nonce). The
token itself never crosses the wire, and a recorded exchange cannot be replayed
because both nonces are fresh. Until this succeeds a connection accepts no payload.

Both ends also state what they offer (``caps``: e.g. a host identity for shared
memory); what both offer is switched on only once each has proved itself.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from .base import Connection
from .frame import Frame, Kind, ProtocolError

NONCE_BYTES = 32
HANDSHAKE_TIMEOUT_S = 5.0


class AuthError(ProtocolError):
    """The peer could not prove it holds the job's token."""


def _mac(token: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(token, label + first + second, hashlib.sha256).digest()


def _expect(frame: Frame, kind: Kind, field: str) -> bytes:
    if frame.kind == Kind.ERROR and frame.meta:
        raise AuthError(f"peer refused: {frame.meta.get('reason')}")
    if frame.kind != kind:
        raise AuthError(f"expected {kind.name} during the handshake, got {frame.kind.name}")
    value = (frame.meta or {}).get(field)
    if not isinstance(value, bytes) or len(value) not in (NONCE_BYTES, hashlib.sha256().digest_size):
        raise AuthError(f"{kind.name} frame lacks a valid {field!r}")
    return value


def _caps(frame: Frame) -> dict:
    """The capabilities a peer offered (none, if it offered something malformed)."""
    caps = (frame.meta or {}).get("caps")
    return caps if isinstance(caps, dict) else {}


def server_handshake(conn: Connection, token: bytes) -> None:
    """Authenticate a client; on failure tell it why (an ERROR frame) and raise."""
    try:
        _authenticate_client(conn, token)
    except ProtocolError as exc:
        try:
            conn.send(Frame(Kind.ERROR, meta={"reason": f"handshake: {exc}"}))
        except (ConnectionError, OSError):
            pass
        raise


def _authenticate_client(conn: Connection, token: bytes) -> None:
    conn.settimeout(HANDSHAKE_TIMEOUT_S)
    server_nonce = secrets.token_bytes(NONCE_BYTES)
    conn.send(Frame(Kind.CHALLENGE, meta={"nonce": server_nonce}))
    reply = conn.recv()
    client_nonce = _expect(reply, Kind.AUTH, "nonce")
    mac = _expect(reply, Kind.AUTH, "mac")
    if not hmac.compare_digest(mac, _mac(token, b"client", server_nonce, client_nonce)):
        raise AuthError(f"authentication failed: client {conn.peer} sent a wrong HMAC (wrong job token)")
    conn.send(Frame(Kind.AUTH_OK, meta={"mac": _mac(token, b"server", client_nonce, server_nonce),
                                        "caps": conn.capabilities()}))
    conn.settimeout(None)
    conn.negotiated(_caps(reply))


def client_handshake(conn: Connection, token: bytes, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
    conn.settimeout(timeout_s)
    challenge = conn.recv()
    server_nonce = _expect(challenge, Kind.CHALLENGE, "nonce")
    client_nonce = secrets.token_bytes(NONCE_BYTES)
    conn.send(Frame(Kind.AUTH, meta={"nonce": client_nonce,
                                     "mac": _mac(token, b"client", server_nonce, client_nonce),
                                     "caps": conn.capabilities()}))
    ok = conn.recv()
    mac = _expect(ok, Kind.AUTH_OK, "mac")
    if not hmac.compare_digest(mac, _mac(token, b"server", client_nonce, server_nonce)):
        raise AuthError(f"server {conn.peer} failed to prove it holds the job token")
    conn.settimeout(None)
    conn.negotiated(_caps(ok))
