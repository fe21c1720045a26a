"""A push that arrives in parts, gathered back into one gradient before anything sees it.

A worker that overlaps communication with backward (:mod:`stalwart.worker.overlap`)
sends a shard's gradient as several PUSH frames flagged ``PART``, each a contiguous
slice named by its first float (meta ``at``), in whatever order backward finished
them (the last layers first). The server receives each slice straight into its place
in the connection's gradient buffer (over shared memory, one copy from the segment: a
part cannot be borrowed, since it must outlive the frame) and answers nothing until the
slices cover the shard; then the push goes on as one ordinary PUSH frame. So the sync
policy, the optimizer, a chain's log, a checkpoint and a stateless server all see
exactly what an unbucketed push of the same gradient would have given them: one push,
one clock, the same bytes (and the same single reply: an acknowledgement or one
refusal).

The parts are checked as their headers arrive, before their bytes are placed: a slice
must lie inside the shard, hold whole floats, not overlap a slice already received, and
belong to the push being gathered (same seq and clock). Anything else breaks the
protocol (the connection is answered with an ERROR naming the problem and closed):
no half-gathered push is ever applied.
"""

from __future__ import annotations

import numpy as np

from ..transport import Flag, Frame, Kind, ProtocolError


class PushAssembly:
    """The parts of one push received so far on one connection (of a shard of ``size`` floats)."""

    def __init__(self, size: int):
        self.size = size
        self.seq: int | None = None  # the push being gathered (None: none is)
        self.clock = 0
        self.ranges: list[tuple[int, int]] = []
        self.filled = 0

    @property
    def open(self) -> bool:
        return self.seq is not None

    def sink(self, frame: Frame, buffer: np.ndarray) -> memoryview:
        """Where part ``frame``'s bytes go in ``buffer`` (the shard-sized gradient buffer)."""
        at = (frame.meta or {}).get("at")
        if type(at) is not int:
            raise ProtocolError(f"a PUSH part names its first float as an integer meta 'at', got {at!r}")
        if frame.payload_len % 4:
            raise ProtocolError(f"a PUSH part of {frame.payload_len} bytes does not hold whole float32 values")
        end = at + frame.payload_len // 4
        if at < 0 or end > self.size:
            raise ProtocolError(f"PUSH part [{at}, {end}) lies outside the shard's {self.size} values")
        if self.open and (frame.seq, frame.clock) != (self.seq, self.clock):
            raise ProtocolError(f"a PUSH part of seq {frame.seq} (clock {frame.clock}) came while push seq "
                                f"{self.seq} (clock {self.clock}) is still incomplete")
        for lo, hi in self.ranges:
            if at < hi and lo < end:
                raise ProtocolError(f"PUSH part [{at}, {end}) overlaps part [{lo}, {hi}) of the same push")
        self.seq, self.clock = frame.seq, frame.clock
        self.ranges.append((at, end))
        self.filled += end - at
        return memoryview(buffer[at:end]).cast("B")

    def take(self, frame: Frame, buffer: np.ndarray) -> Frame | None:
        """After part ``frame`` was received: the whole push as one PUSH frame once the
        parts cover the shard (and the assembly is empty again), else None."""
        if self.filled < self.size:
            return None
        meta = {k: v for k, v in (frame.meta or {}).items() if k != "at"} or None
        whole = Frame(Kind.PUSH, shard=frame.shard, worker=frame.worker, seq=frame.seq, clock=frame.clock,
                      flags=frame.flags & ~Flag.PART, meta=meta, payload_len=buffer.nbytes,
                      payload=memoryview(buffer).cast("B"))
        self.seq, self.ranges, self.filled = None, [], 0
        return whole
