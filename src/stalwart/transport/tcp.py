"""TCP: the reliable transport every job can fall back on.

Between two ends on the same host (both say so when they authenticate) large payloads
go through shared memory instead of the socket (:mod:`stalwart.transport.shm`); the
socket still carries every frame, in order. ``shm=False`` keeps everything on the socket.
"""

from __future__ import annotations

import dataclasses
import socket
import threading

from . import shm
from .base import Borrow, Connection, ConnectionClosed, Listener, PayloadSink, Transport, split_address
from .frame import HEADER_SIZE, Frame, ProtocolError, decode_header, decode_meta, encode_header


def _close(sock: socket.socket) -> None:
    """Shut down before closing, so that a thread blocked on the socket wakes up."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class TcpConnection(Connection):
    def __init__(self, sock: socket.socket, max_payload: int = 0, shm_allowed: bool = True):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.max_payload = max_payload
        self.shm_allowed = shm_allowed
        self.shm_out: shm.ShmSender | None = None   # set once both ends share a host
        self.shm_in: shm.ShmReceiver | None = None
        self._send_lock = threading.Lock()
        self._header = bytearray(HEADER_SIZE)
        self._moved = {"tcp": 0, "shm": 0}
        try:
            host, port = sock.getpeername()[:2]
            self.peer = f"{host}:{port}"
        except OSError:
            self.peer = "?"

    def settimeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def fileno(self) -> int:
        return self.sock.fileno()  # frames are read straight off the socket: no buffer hides one

    def bytes_moved(self) -> dict[str, int]:
        return dict(self._moved)

    def capabilities(self) -> dict:
        host = shm.host_identity() if self.shm_allowed else None
        return {"shm": host} if host else {}

    def negotiated(self, peer: dict) -> None:
        mine = self.capabilities().get("shm")
        if mine is not None and peer.get("shm") == mine:
            self.shm_out, self.shm_in = shm.ShmSender(), shm.ShmReceiver()

    def send(self, frame: Frame, payload: memoryview | bytes | None = None) -> None:
        body = memoryview(payload).cast("B") if payload is not None else memoryview(b"")
        with self._send_lock:
            if self.shm_out is not None and body.nbytes >= shm.MIN_BYTES:
                entry = self.shm_out.write(body)
                if entry is not None:
                    frame = dataclasses.replace(frame, meta={**(frame.meta or {}), "shm": entry})
                    self._moved["shm"] += body.nbytes
                    body = memoryview(b"")
            self._moved["tcp"] += body.nbytes
            buffers = [memoryview(encode_header(frame, body.nbytes)), body]
            try:
                while buffers:
                    sent = self.sock.sendmsg(buffers)
                    while buffers and sent >= buffers[0].nbytes:
                        sent -= buffers[0].nbytes
                        buffers.pop(0)
                    if buffers and sent:
                        buffers[0] = buffers[0][sent:]
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ConnectionClosed(f"{self.peer}: {exc}") from None

    def _recv_exact(self, view: memoryview) -> None:
        got, total = 0, view.nbytes
        while got < total:
            try:
                n = self.sock.recv_into(view[got:])
            except ConnectionResetError as exc:
                raise ConnectionClosed(f"{self.peer}: {exc}") from None
            if n == 0:
                if got == 0 and view.obj is self._header:
                    raise ConnectionClosed(f"{self.peer} closed the connection")
                raise ConnectionClosed(f"{self.peer} closed the connection mid-frame")
            got += n

    def recv(self, sink: PayloadSink | None = None) -> Frame:
        if self.shm_in is not None:
            self.shm_in.release()  # whatever the last frame borrowed is the sender's again
        header = memoryview(self._header)
        self._recv_exact(header)
        frame, meta_len = decode_header(header, self.max_payload)
        if meta_len:
            raw = bytearray(meta_len)
            self._recv_exact(memoryview(raw))
            frame.meta = decode_meta(raw)
            if "shm" in frame.meta:
                return self._recv_shared(frame, sink)
        if frame.payload_len:
            target = sink(frame) if sink is not None else None
            if isinstance(target, Borrow):
                target = target.fallback  # on the socket: into the caller's buffer, as asked
            if target is None:
                target = memoryview(bytearray(frame.payload_len))
            elif target.nbytes != frame.payload_len:
                # Drain so the stream stays in step, then refuse.
                self._recv_exact(memoryview(bytearray(frame.payload_len)))
                raise ProtocolError(f"{frame.kind.name} payload of {frame.payload_len} bytes "
                                    f"does not match the expected {target.nbytes}")
            self._recv_exact(target)
            frame.payload = target
            self._moved["tcp"] += frame.payload_len
        return frame

    def _recv_shared(self, frame: Frame, sink: PayloadSink | None) -> Frame:
        """A frame whose payload waits in the peer's shared-memory segment."""
        entry = frame.meta.pop("shm")
        frame.meta = frame.meta or None
        if self.shm_in is None:
            raise ProtocolError("a frame names shared memory on a connection that did not agree to it")
        if frame.payload_len:
            raise ProtocolError("a frame carries a payload both inline and in shared memory")
        length = entry[2] if isinstance(entry, list) and len(entry) == 3 and type(entry[2]) is int else -1
        if not 0 < length <= self.max_payload:
            raise ProtocolError(f"shared-memory payload of {length} bytes is outside this connection's "
                                f"limit of {self.max_payload} bytes")
        frame.payload_len = length
        target = sink(frame) if sink is not None else None
        expected = target.fallback if isinstance(target, Borrow) else target
        if expected is not None and expected.nbytes != length:
            raise ProtocolError(f"{frame.kind.name} payload of {length} bytes "
                                f"does not match the expected {expected.nbytes}")
        frame.payload = self.shm_in.borrow(entry) if isinstance(target, Borrow) \
            else self.shm_in.read_into(entry, target)
        self._moved["shm"] += length
        return frame

    def close(self) -> None:
        _close(self.sock)
        with self._send_lock:
            if self.shm_out is not None:
                self.shm_out.close()
        if self.shm_in is not None:
            self.shm_in.close()


class TcpListener(Listener):
    def __init__(self, sock: socket.socket, shm_allowed: bool = True):
        self.sock = sock
        self.shm_allowed = shm_allowed
        host, port = sock.getsockname()[:2]
        self.address = f"{host}:{port}"

    def accept(self) -> TcpConnection:
        sock, _ = self.sock.accept()
        return TcpConnection(sock, shm_allowed=self.shm_allowed)

    def close(self) -> None:
        _close(self.sock)


class TcpTransport(Transport):
    name = "tcp"

    def listen(self, host: str, port: int = 0) -> TcpListener:
        sock = socket.create_server((host, port), backlog=128, reuse_port=False)
        return TcpListener(sock, self.shm)

    def listen_fd(self, fd: int) -> TcpListener:
        """Adopt a listening socket handed down by the launcher (no port race)."""
        return TcpListener(socket.socket(fileno=fd), self.shm)

    def connect(self, address: str, timeout: float = 5.0) -> TcpConnection:
        sock = socket.create_connection(split_address(address), timeout=timeout)
        sock.settimeout(None)
        return TcpConnection(sock, shm_allowed=self.shm)
