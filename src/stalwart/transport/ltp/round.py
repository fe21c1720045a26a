"""The receiving side of one round: placement, Early Close, Bubble Filling.

**Placement.** A round's buffer is a (packets x payload-per-packet) array; a batch of
arrived packets is written into its rows with one fancy-indexed assignment and marked
in a boolean bitmap, whatever their order or duplication.

**Early Close** (:class:`EarlyClose`). The rule rests on one observation and one
measurement. The observation: a sender emits a round's packets in order, and the last
one is must-arrive (retransmitted until acknowledged). Once the last packet is here,
everything sent before it has either arrived or been dropped at a queue; waiting
longer only pays for reordering, which a single path barely has. So the receiver waits
a short *reorder grace* after the last packet (four recent inter-arrival gaps, clamped
to 0.2-5 ms) and closes. The measurement: how long a whole round takes to arrive
(first to last packet), smoothed over recent rounds. A round still incomplete at
``slack`` times that span after its first packet is a flow stuck behind the others at
the bottleneck (incast); waiting for its tail would hold the whole synchronization
round, so the receiver closes it there, if enough has arrived. Both closes require at
least ``min_fraction`` of the packets: a round below it never closes with loss; once
the last packet is in, the receiver asks the sender to resend what is missing (a
bitmap), and again if nothing new arrives, until the fraction is reached. The lost
fraction of every round is reported with its frame.

**Bubble Filling** (:func:`fill`). What is missing when a round closes is filled:
``rescale`` (zeros, and what arrived scaled up by sent/received bytes, an unbiased
estimate under random loss), ``zero`` (plain zeros, as MLT), or ``previous`` (the same
sender's values from its last round, which carry the gradient's slow direction).
"""

from __future__ import annotations

import numpy as np

from .packet import HEADER_SIZE, packet_count

GRACE_MIN_S, GRACE_MAX_S, GRACE_GAPS = 0.0002, 0.005, 4
EWMA = 0.25
RESEND_EVERY_S = 0.02


class Reassembly:
    def __init__(self, round_: int, frame_len: int, per_packet: int, store: np.ndarray):
        self.round, self.frame_len, self.per_packet = round_, frame_len, per_packet
        self.total = packet_count(frame_len, per_packet)
        self.rows = store[:self.total * per_packet].reshape(self.total, per_packet)
        self.got = np.zeros(self.total, dtype=bool)
        self.count = 0
        self.bytes = 0
        self.first_t: float | None = None
        self.last_t: float | None = None     # arrival of the most recent new packet
        self.last_seen_t: float | None = None  # arrival of the round's last packet
        self.resend_at: float | None = None
        self.resends = 0
        self.duplicates = 0

    @property
    def complete(self) -> bool:
        return self.count == self.total

    @property
    def fraction(self) -> float:
        return self.count / self.total

    def place(self, head: np.ndarray, rows: np.ndarray, now: float) -> int:
        """Write a batch of packets of this round (already validated) into the buffer."""
        seq = head["seq"].astype(np.int64)
        seq, first = np.unique(seq, return_index=True)
        head, rows = head[first], rows[first]
        new = ~self.got[seq]
        self.duplicates += int(seq.size - new.sum())
        if not new.any():
            return 0
        seq, head, rows = seq[new], head[new], rows[new]
        pp = self.per_packet
        length = head["length"].astype(np.int64)
        full = length == pp
        if full.any():
            self.rows[seq[full]] = rows[full, HEADER_SIZE:HEADER_SIZE + pp]
        for i in np.flatnonzero(~full):  # at most the one short last packet
            self.rows[seq[i], :length[i]] = rows[i, HEADER_SIZE:HEADER_SIZE + length[i]]
        self.got[seq] = True
        self.count += seq.size
        self.bytes += int(length.sum())
        if self.first_t is None:
            self.first_t = now
        self.last_t = now
        if self.got[-1] and self.last_seen_t is None:
            self.last_seen_t = now
        return int(seq.size)

    def missing(self) -> np.ndarray:
        return ~self.got

    def delivery_rate(self) -> float:
        """Bytes/s this round arrived at (0 when too few packets to time)."""
        if self.first_t is None or self.last_t is None or self.count < 3:
            return 0.0
        span = self.last_t - self.first_t
        return self.bytes * (self.count - 1) / self.count / span if span > 1e-4 else 0.0


class EarlyClose:
    """When to close a round; keeps the recent measurements the rule adapts to."""

    def __init__(self, min_fraction: float, slack: float):
        if not 0 < min_fraction <= 1:
            raise ValueError(f"min_fraction {min_fraction} must lie in (0, 1]")
        self.min_fraction, self.slack = min_fraction, slack
        self.span_s: float | None = None   # smoothed first-to-last arrival time of a round
        self.gap_s: float | None = None    # smoothed time between arrivals within a round

    def grace(self) -> float:
        gap = self.gap_s if self.gap_s is not None else GRACE_MAX_S / GRACE_GAPS
        return min(GRACE_MAX_S, max(GRACE_MIN_S, GRACE_GAPS * gap))

    def decide(self, r: Reassembly, now: float) -> tuple[str, float]:
        """("close", reason) / ("resend", 0) / ("wait", seconds to wait before asking again)."""
        if r.complete:
            return "close:complete", 0.0
        enough = r.fraction >= self.min_fraction
        grace = self.grace()
        if r.last_seen_t is not None:
            settle = max(r.last_seen_t, r.last_t or 0.0) + grace
            if now < settle:
                return "wait", settle - now
            if enough:
                return "close:early", 0.0
            if r.resend_at is None or now >= r.resend_at:
                return "resend", 0.0
            return "wait", r.resend_at - now
        if r.first_t is not None and self.span_s is not None:
            deadline = r.first_t + self.slack * self.span_s + grace
            if now >= deadline and enough:
                return "close:deadline", 0.0
            if now < deadline:
                return "wait", deadline - now
        return "wait", RESEND_EVERY_S  # the sender retransmits the last packet until we have it

    def learn(self, r: Reassembly) -> None:
        """Fold a closed round's timing into the estimates. A round closed before its last
        packet came counts as the span it was on course for (its span over the fraction
        received), so that a network grown slower lengthens the deadline with it."""
        if r.first_t is None or r.last_t is None or r.count < 2:
            return
        end = r.last_seen_t if r.last_seen_t is not None else r.last_t
        gap = (end - r.first_t) / (r.count - 1)
        span = gap * (r.total - 1)
        self.span_s = span if self.span_s is None else (1 - EWMA) * self.span_s + EWMA * span
        self.gap_s = gap if self.gap_s is None else (1 - EWMA) * self.gap_s + EWMA * gap


FILLS = ("rescale", "zero", "previous")


def fill(rule: str, r: Reassembly, previous: np.ndarray | None) -> None:
    """Fill the lost packets' ranges of ``r`` in place (``previous``: the same sender's
    last delivered round, as bytes laid out like this one, or None)."""
    if rule not in FILLS:
        raise ValueError(f"unknown bubble fill {rule!r}; choose one of {list(FILLS)}")
    lost = ~r.got
    if not lost.any():
        return
    if rule == "previous" and previous is not None and previous.size >= r.rows.size:
        r.rows[lost] = previous[:r.rows.size].reshape(r.rows.shape)[lost]
        return
    r.rows[lost] = 0
    if rule == "rescale" and r.bytes:
        values = r.rows.reshape(-1)[:r.frame_len // 4 * 4].view(np.float32)
        values *= np.float32(r.frame_len / r.bytes)
