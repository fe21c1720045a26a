"""UDP sockets with segmentation and receive offload (UDP_SEGMENT / UDP_GRO).

One ``sendmsg`` hands the kernel up to 64 KiB of equal-sized packets, which it cuts
into datagrams (GSO); one ``recvmsg_into`` returns up to 64 KiB of datagrams of one
flow coalesced, with their segment size in a control message (GRO). Both cut the
per-packet cost of Python to a per-64-KiB cost. Where the kernel lacks either, each
falls back to one datagram per call.
"""

from __future__ import annotations

import socket
import struct

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
SOCKET_BUFFER = 16 << 20
_SEGMENT = struct.Struct("=H")
_GRO = struct.Struct("=i")
_ANC = socket.CMSG_SPACE(_GRO.size)


def make_socket(host: str, port: int = 0, gro: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):  # SO_*BUFFORCE as root
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    if gro:
        try:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError:
            pass
    sock.bind((host, port))
    return sock


class Sender:
    """Sends rows of a packet buffer, in GSO batches where the kernel allows."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.gso = True
        self.datagrams = 0

    def send(self, data: memoryview, stride: int, count: int) -> None:
        """``count`` packets of ``stride`` bytes back to back in ``data`` (the last may be shorter)."""
        if count > 1 and self.gso:
            try:
                self.sock.sendmsg([data], [(SOL_UDP, UDP_SEGMENT, _SEGMENT.pack(stride))])
                self.datagrams += count
                return
            except OSError as exc:
                if exc.errno not in (22, 5, 95):  # EINVAL, EIO, EOPNOTSUPP: no GSO here
                    raise
                self.gso = False
        for i in range(count):
            self.sock.send(data[i * stride:(i + 1) * stride])
            self.datagrams += 1


def receive(sock: socket.socket, buf: bytearray) -> tuple[int, int, tuple]:
    """One receive: (bytes, segment size, sender address)."""
    nbytes, anc, _flags, addr = sock.recvmsg_into([buf], _ANC)
    segment = nbytes
    for level, kind, data in anc:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= _GRO.size:
            segment = _GRO.unpack_from(data)[0] or nbytes
    return nbytes, segment, addr
