"""LTP packets: a fixed little-endian header, then payload bytes. Built and parsed in batches.

Every data packet says where its bytes go (round, shard, offset, length, sequence
number, the frame's length), so a receiver places it straight into the round's buffer
in whatever order it arrives. A batch (one GSO send, one GRO receive: up to 64 KiB) is
encoded and decoded with NumPy on a structured view of the buffer, never a Python loop
per packet.

Acknowledgements travel the other way as ACK packets: the same header, then an
:data:`ACK_INFO` block and a selective-ACK bitmap (bit ``i`` set: packet ``seq + i``
arrived).
"""

from __future__ import annotations

import struct

import numpy as np

MAGIC = 0x544C  # "LT" little-endian
VERSION = 1

HEADER_DTYPE = np.dtype([
    ("magic", "<u2"), ("version", "u1"), ("type", "u1"), ("flags", "u1"), ("reserved", "u1"),
    ("shard", "<u2"), ("job", "<u4"), ("session", "<u8"), ("round", "<u4"), ("seq", "<u4"),
    ("total", "<u4"), ("offset", "<u4"), ("length", "<u4"), ("frame_len", "<u4"),
])
HEADER_SIZE = HEADER_DTYPE.itemsize  # 44
IP_UDP_OVERHEAD = 28
MAX_DATAGRAM = 65507

# packet types
DATA, ACK = 1, 2
# flags
MUST = 1      # must arrive: retransmitted until acknowledged (the first and the last packet)
LAST = 2      # the last packet of the round
RETX = 4      # a retransmission
CLOSED = 8    # ACK: the receiver closed the round (info carries its delivery rate and loss)
RESEND = 16   # ACK: too little arrived; resend every packet whose bit is clear

# ACK info: delivery rate the receiver measured (bytes/s; 0 = unknown), packets received,
# lost fraction at close.
ACK_INFO = struct.Struct("<dIf")


class PacketError(ValueError):
    """A datagram that is not a valid LTP packet for this receiver."""


def payload_per_packet(mtu: int) -> int:
    """Payload bytes per data packet so that a packet fits one ``mtu``-sized IP frame;
    a multiple of 4 so that float32 values never straddle two packets."""
    room = mtu - IP_UDP_OVERHEAD - HEADER_SIZE
    if room < 64:
        raise ValueError(f"an MTU of {mtu} leaves no room for LTP payload (need at least "
                         f"{IP_UDP_OVERHEAD + HEADER_SIZE + 64})")
    return min(room, MAX_DATAGRAM - HEADER_SIZE) // 4 * 4


def packet_count(frame_len: int, per_packet: int) -> int:
    return max(1, -(-frame_len // per_packet))


def header_view(rows: np.ndarray) -> np.ndarray:
    """The headers of a 2-D uint8 array of packets (one per row), as a structured 1-D view."""
    return rows[:, :HEADER_SIZE].view(HEADER_DTYPE)[:, 0]


class PacketBuffer:
    """The packets of one round, laid out back to back as they go on the wire.

    Row ``i`` is packet ``i``: its header, then its slice of the payload. Each packet is
    ``stride`` bytes except the last, which may be shorter. Rows can be sent in any
    grouping (GSO sends them as one buffer of equal-sized segments) and resent from here.
    """

    def __init__(self, per_packet: int):
        self.per_packet = per_packet
        self.stride = HEADER_SIZE + per_packet
        self._store = np.empty(0, dtype=np.uint8)
        self.rows = self._store.reshape(0, self.stride)
        self.total = 0
        self.last_len = 0

    def fill(self, payload: np.ndarray, *, job: int, session: int, round_: int, shard: int) -> None:
        data = payload.view(np.uint8).reshape(-1)
        frame_len = data.size
        n = packet_count(frame_len, self.per_packet)
        if self._store.size < n * self.stride:
            self._store = np.empty(n * self.stride, dtype=np.uint8)
        rows = self.rows = self._store[:n * self.stride].reshape(n, self.stride)
        pp = self.per_packet
        full = frame_len // pp
        rows[:full, HEADER_SIZE:] = data[:full * pp].reshape(full, pp)
        rem = frame_len - full * pp
        if rem:
            rows[full, HEADER_SIZE:HEADER_SIZE + rem] = data[full * pp:]
        seq = np.arange(n, dtype=np.uint32)
        head = header_view(rows)
        head["magic"], head["version"], head["type"], head["reserved"] = MAGIC, VERSION, DATA, 0
        head["shard"], head["job"], head["session"], head["round"] = shard, job, session, round_
        head["seq"], head["total"], head["offset"] = seq, n, seq * pp
        head["length"] = pp
        head["frame_len"] = frame_len
        head["flags"] = 0
        self.last_len = rem or min(pp, frame_len)
        head["length"][n - 1] = self.last_len
        head["flags"][0] |= MUST
        head["flags"][n - 1] |= MUST | LAST
        self.total = n

    def wire_len(self, seq: int) -> int:
        return self.stride if seq < self.total - 1 else HEADER_SIZE + self.last_len

    def mark_retransmitted(self, seqs: np.ndarray) -> None:
        header_view(self.rows)["flags"][seqs] |= RETX


def parse_batch(buf: memoryview | bytearray | np.ndarray, nbytes: int, segment: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split ``nbytes`` of a received buffer into segments of ``segment`` bytes (the last
    may be shorter, as GRO delivers them) and read their headers.

    Returns (rows, headers, valid): rows is an (n, segment) uint8 view, headers the
    structured view of their first bytes, valid a mask of packets whose header is
    internally consistent (magic, version, type, lengths). Checks that need the
    receiver's state (job, session, sizes) are the caller's.
    """
    if segment < HEADER_SIZE or nbytes < HEADER_SIZE:
        raise PacketError(f"a datagram of {min(nbytes, segment)} bytes is shorter than the "
                          f"{HEADER_SIZE}-byte LTP header")
    n = -(-nbytes // segment)
    raw = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)
    if raw.size >= n * segment:
        flat = raw[:n * segment]
    else:  # a short last segment at the end of the buffer: pad a copy to whole rows
        flat = np.zeros(n * segment, dtype=np.uint8)
        flat[:nbytes] = raw[:nbytes]
    rows = flat.reshape(n, segment)
    seglen = np.full(n, segment, dtype=np.int64)
    seglen[-1] = nbytes - (n - 1) * segment
    ok = seglen >= HEADER_SIZE
    head = header_view(rows).copy()  # a copy: the buffer is reused by the next receive
    head[~ok] = np.zeros(1, dtype=HEADER_DTYPE)
    ok &= (head["magic"] == MAGIC) & (head["version"] == VERSION)
    data = head["type"] == DATA
    ok &= data | (head["type"] == ACK)
    ok &= ~data | (head["length"].astype(np.int64) == seglen - HEADER_SIZE)
    ok &= ~data | ((head["seq"] < head["total"]) & (head["offset"].astype(np.int64) + head["length"]
                                                    <= head["frame_len"]))
    return rows, head, ok


def encode_ack(*, job: int, session: int, round_: int, shard: int, flags: int, base: int,
               bits: np.ndarray | None = None, rate: float = 0.0, received: int = 0, lost: float = 0.0) -> bytes:
    """An ACK packet; ``bits`` is a boolean array, bit ``i`` for packet ``base + i``."""
    bitmap = np.packbits(bits, bitorder="little").tobytes() if bits is not None else b""
    nbits = 0 if bits is None else bits.size
    head = np.zeros(1, dtype=HEADER_DTYPE)
    head["magic"], head["version"], head["type"], head["flags"] = MAGIC, VERSION, ACK, flags
    head["shard"], head["job"], head["session"], head["round"] = shard, job, session, round_
    head["seq"], head["total"], head["length"] = base, nbits, ACK_INFO.size + len(bitmap)
    return head.tobytes() + ACK_INFO.pack(rate, received, lost) + bitmap


def decode_ack(head: np.void, body: bytes | memoryview) -> tuple[float, int, float, np.ndarray]:
    """(rate, received, lost, bits) of an ACK whose header was parsed already."""
    nbits = int(head["total"])
    need = ACK_INFO.size + -(-nbits // 8)
    if len(body) < need:
        raise PacketError(f"ACK of {len(body)} bytes is shorter than its {nbits}-bit bitmap needs ({need})")
    rate, received, lost = ACK_INFO.unpack_from(body)
    bits = np.unpackbits(np.frombuffer(body, dtype=np.uint8, count=need - ACK_INFO.size, offset=ACK_INFO.size),
                         count=nbits, bitorder="little").astype(bool)
    return rate, received, lost, bits
