"""A threaded frame server: accept, authenticate, then hand each frame to a handler.

Both the coordinator and the parameter servers are one of these. One thread per
connection keeps the handlers simple (blocking waits are natural there), and the
receive path releases the GIL while bytes arrive. A connection that breaks the
protocol is answered with an ERROR frame naming the problem and closed; the service
and its state carry on.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from ..metrics import EventLog
from .auth import AuthError, server_handshake
from .base import Connection, ConnectionClosed, Listener
from .frame import Frame, Kind, ProtocolError


class Refused(Exception):
    """A well-formed request whose content is refused (a NaN gradient, a clock from the
    past): the peer gets an ERROR frame naming ``reason`` and the connection stays open.
    ``meta`` goes into the ERROR frame beside the reason (``redirect``, ``retry``)."""

    def __init__(self, reason: str, **meta):
        super().__init__(reason)
        self.reason, self.meta = reason, meta


class Session:
    """Per-connection state a handler may keep (who the peer is, its buffers)."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.worker: int | None = None
        self.data: dict[str, Any] = {}


class FrameService:
    max_payload = 0  # after authentication; subclasses raise it to what they accept

    def __init__(self, listener: Listener, token: bytes, log: EventLog):
        self.listener, self.token, self.log = listener, token, log
        self.address = listener.address
        self._closed = threading.Event()
        self._sessions: set[Session] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # --- to override -------------------------------------------------------------
    def handle(self, session: Session, frame: Frame) -> None:
        raise NotImplementedError

    def payload_sink(self, session: Session, frame: Frame) -> memoryview | None:
        return None

    def on_disconnect(self, session: Session) -> None:
        pass

    def refuse(self, session: Session, frame: Frame, refused: Refused) -> None:
        """Answer a refused request with an ERROR frame naming the reason; the session goes on."""
        self.log.emit("rejected", peer=session.conn.peer, worker=frame.worker, reason=refused.reason)
        session.conn.send(Frame(Kind.ERROR, shard=frame.shard, meta={"reason": refused.reason, **refused.meta}))

    # --- machinery ----------------------------------------------------------------
    def start(self) -> "FrameService":
        self._thread = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn = self.listener.accept()
            except OSError:
                if self._closed.is_set():
                    return
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name=f"conn-{conn.peer}").start()

    def _serve(self, conn: Connection) -> None:
        try:
            server_handshake(conn, self.token)
        except ConnectionClosed:
            # Gone before answering the challenge: a liveness probe (transport.base.answers),
            # or a peer that gave up. Nothing was claimed, so there is nothing to report.
            conn.close()
            return
        except (AuthError, ProtocolError, ConnectionError, socket.timeout, OSError) as exc:
            self.log.emit("rejected", peer=conn.peer, reason=f"handshake: {exc}")
            conn.close()
            return
        self.serve_authenticated(conn)

    def serve_authenticated(self, conn: Connection) -> None:
        """Handle frames from an authenticated connection until it ends (also one we dialed)."""
        conn.max_payload = self.max_payload
        session = Session(conn)
        with self._lock:
            self._sessions.add(session)
        try:
            while not self._closed.is_set():
                frame = conn.recv(lambda f: self.payload_sink(session, f))
                try:
                    self.handle(session, frame)
                except Refused as refused:
                    self.refuse(session, frame, refused)
        except ProtocolError as exc:
            self.log.emit("rejected", peer=conn.peer, worker=session.worker, reason=str(exc))
            try:
                conn.send(Frame(Kind.ERROR, meta={"reason": str(exc)}))
            except (ConnectionError, OSError):
                pass
        except (ConnectionError, OSError):
            pass
        finally:
            with self._lock:
                self._sessions.discard(session)
            conn.close()
            self.on_disconnect(session)

    def close(self) -> None:
        self._closed.set()
        self.listener.close()
        with self._lock:
            sessions = list(self._sessions)
        for s in sessions:
            s.conn.close()
