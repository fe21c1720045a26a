"""The wire format shared by every transport.

A frame is a fixed 44-byte binary header, an optional msgpack ``meta`` map (control
messages only) and an optional raw ``payload`` (tensor bytes). Data-plane messages
(push, pull, params) carry everything they need in the fixed fields, so the hot path
never touches msgpack; the payload is sent from and received into the caller's own
buffers, so a gradient crosses the wire without an intermediate copy.

Every field a peer controls is validated before anything is allocated or applied:
a frame that fails validation raises :class:`ProtocolError` naming the problem.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

MAGIC = b"STLW"
WIRE_VERSION = 1
# magic, version, kind, flags, shard, worker, seq, clock, meta_len, payload_len
HEADER = struct.Struct("!4sBBHIIQQIQ")
HEADER_SIZE = HEADER.size
MAX_META = 64 * 1024
NO_WORKER = 0xFFFFFFFF  # observers (the evaluator, benchmarks) that sync policies ignore


class Kind(enum.IntEnum):
    CHALLENGE = 1      # server -> client: nonce
    AUTH = 2           # client -> server: nonce + HMAC
    AUTH_OK = 3        # server -> client: HMAC proving the server knows the token too
    ERROR = 4          # meta: {"reason": str}
    PUSH = 10          # worker -> server: gradient of one shard for `clock`
    ACK = 11           # server -> worker: a PUSH, INIT, DONE or FLUSH accounted; version = the shard's after it
    PULL = 12          # worker -> server: clock = the worker's clock just pushed (gate)
    PARAMS = 13        # server -> worker: payload = shard parameters, version = theirs
    INIT = 14          # worker -> server: initial parameters (first one wins)
    DONE = 15          # worker -> server: leaving the job; sync policies stop waiting
    FLUSH = 16         # worker -> stateless server: the summed change of a backlog (meta: count, base_version)
    BUFFERS = 17       # worker <-> shard 0's server: a worker's model buffers; answered with the workers' mean
    REQUEST = 20       # control: meta {"op": ..., ...}
    REPLY = 21         # control: meta
    STOP = 22          # server -> worker: the job is stopping, do not wait further
    REPLICATE = 30     # chain: predecessor -> successor, one log entry at position lsn
    REPLICATE_ACK = 31 # chain: successor -> predecessor, every entry up to lsn is at the tail
    STATE = 32         # chain: a replica's whole state at lsn (payload: an encoded Snapshot)


class Flag(enum.IntFlag):
    NONE = 0
    ASYNC_PULL = 1  # pull the latest parameters without waiting on the sync gate
    AFTER_PUSH = 2  # this pull follows a push with the same seq: answer with that push applied
    PART = 4        # this PUSH is one slice of the shard's gradient (meta "at": its first float);
                    # the server answers once, when the slices cover the shard


class ProtocolError(Exception):
    """A peer sent something that does not follow the protocol; the reason says what."""


@dataclass
class Frame:
    kind: Kind
    shard: int = 0
    worker: int = NO_WORKER
    seq: int = 0
    clock: int = 0
    flags: int = 0
    meta: dict[str, Any] | None = None
    payload_len: int = 0
    # filled on receive when the payload was not placed into a caller's buffer
    payload: memoryview | None = field(default=None, repr=False)

    # The two numeric header fields carry other things in some kinds; these names say
    # which. ``seq`` is a worker's push sequence in PUSH and PULL, ``clock`` its clock.
    @property
    def version(self) -> int:
        """ACK and PARAMS: the shard's version (in the ``clock`` field)."""
        return self.clock

    @property
    def lsn(self) -> int:
        """REPLICATE, REPLICATE_ACK and STATE: the chain's log position (in ``seq``)."""
        return self.seq


def encode_header(frame: Frame, payload_len: int) -> bytes:
    """Fixed header plus packed meta, ready to be sent before the payload."""
    try:
        meta = b"" if frame.meta is None else msgpack.packb(frame.meta, use_bin_type=True)
    except (OverflowError, TypeError, ValueError) as exc:
        raise ProtocolError(f"meta cannot be encoded: {exc}") from None
    if len(meta) > MAX_META:
        raise ProtocolError(f"meta of {len(meta)} bytes exceeds the {MAX_META}-byte limit")
    try:
        head = HEADER.pack(MAGIC, WIRE_VERSION, int(frame.kind), int(frame.flags), frame.shard,
                           frame.worker, frame.seq, frame.clock, len(meta), payload_len)
    except struct.error as exc:
        raise ProtocolError(f"header field out of range: {exc}") from None
    return head + meta


def decode_header(raw: bytes | memoryview, max_payload: int) -> tuple[Frame, int]:
    """Parse and validate a fixed header; returns the frame and the meta length."""
    if len(raw) != HEADER_SIZE:
        raise ProtocolError(f"truncated header: {len(raw)} of {HEADER_SIZE} bytes")
    magic, version, kind, flags, shard, worker, seq, clock, meta_len, payload_len = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}: not a stalwart frame")
    if version != WIRE_VERSION:
        raise ProtocolError(f"wire version {version} is not supported (expected {WIRE_VERSION})")
    try:
        kind = Kind(kind)
    except ValueError:
        raise ProtocolError(f"unknown frame kind {kind}") from None
    if meta_len > MAX_META:
        raise ProtocolError(f"meta length {meta_len} exceeds the {MAX_META}-byte limit")
    if payload_len > max_payload:
        raise ProtocolError(f"payload of {payload_len} bytes exceeds this connection's "
                            f"limit of {max_payload} bytes")
    frame = Frame(kind=kind, shard=shard, worker=worker, seq=seq, clock=clock, flags=flags,
                  payload_len=payload_len)
    return frame, meta_len


def decode_meta(raw: bytes | memoryview) -> dict[str, Any]:
    try:
        meta = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable meta: {exc}") from None
    if not isinstance(meta, dict):
        raise ProtocolError(f"meta must be a map, got {type(meta).__name__}")
    return meta
