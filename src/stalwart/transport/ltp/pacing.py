"""Pacing that does not read loss as congestion: BBR's bandwidth probe, measured at the receiver.

A loss-tolerant sender must not simply blast: eight of them into one shallow buffer
would lose most of what they send. It must not back off on loss either, as TCP does,
since LTP expects and tolerates loss. So senders pace at an estimate of their share
of the bottleneck, and the estimate comes from the one place that sees every flow of
an incast: the receiver.

- The receiver's :class:`BottleneckMeter` samples the rate at which *all* LTP packets
  arrive (10 ms samples) and keeps the largest sample of the last two seconds: the
  bottleneck bandwidth, as BBR's windowed max filter estimates it. While the senders
  together offer more than the bottleneck carries (the first round is sent unpaced),
  the arrivals run at exactly the bottleneck's rate.
- A sender's share is that estimate over the number of senders active in the last
  200 ms; the receiver reports it in every round's closing ACK (and in resend requests).
- A sender (:class:`Pacer`) paces at its share times a gain that cycles over rounds,
  as in BBR's ProbeBW: 1.25 probes for more bandwidth (a larger sample raises the
  estimate), 0.75 drains the queue the probe built, 1.0 holds. Senders start at
  random phases so that their probes do not coincide.
"""

from __future__ import annotations

import threading
from collections import deque

GAINS = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
BURST_S = 0.001         # one paced burst carries about this much time at the pacing rate
MIN_BURST = 4           # packets: fewer would make per-call overhead the limit
SAMPLE_S, WINDOW_S, ACTIVE_S = 0.01, 2.0, 0.2


class BottleneckMeter:
    """The receiver's estimate of the bottleneck: windowed max of the aggregate arrival rate."""

    def __init__(self) -> None:
        # The receive thread adds; every connection's thread asks for the share.
        self._lock = threading.Lock()
        self._start: float | None = None
        self._bytes = 0
        self._samples: deque[tuple[float, float]] = deque()  # (time, bytes/s)
        self._last_seen: dict[int, float] = {}  # sender -> last arrival

    def add(self, sender: int, nbytes: int, now: float) -> None:
        with self._lock:
            self._add(sender, nbytes, now)

    def _add(self, sender: int, nbytes: int, now: float) -> None:
        self._last_seen[sender] = now
        if self._start is None:
            self._start = now
        self._bytes += nbytes
        if now - self._start >= SAMPLE_S:
            self._samples.append((now, self._bytes / (now - self._start)))
            self._start, self._bytes = now, 0
            while self._samples and self._samples[0][0] < now - WINDOW_S:
                self._samples.popleft()

    def forget(self, sender: int) -> None:
        with self._lock:
            self._last_seen.pop(sender, None)

    def share(self, now: float) -> float:
        """Bytes/s one active sender may send; 0 while nothing has been measured."""
        with self._lock:
            if not self._samples:
                return 0.0
            active = sum(1 for t in self._last_seen.values() if t >= now - ACTIVE_S) or 1
            return max(rate for _, rate in self._samples) / active


class Pacer:
    def __init__(self, initial_bytes_per_s: float | None = None, phase: int = 0):
        self.share = initial_bytes_per_s
        self.phase = phase % len(GAINS)

    def on_report(self, bytes_per_s: float) -> None:
        if bytes_per_s > 0:
            self.share = bytes_per_s

    def next_round(self) -> None:
        self.phase = (self.phase + 1) % len(GAINS)

    @property
    def rate(self) -> float | None:
        """Bytes per second to pace at now; None: unpaced (nothing measured or configured yet)."""
        return None if self.share is None else self.share * GAINS[self.phase]

    def burst(self, stride: int, most: int) -> int:
        """Packets per send call: about BURST_S of the rate, at least MIN_BURST, at most ``most``."""
        rate = self.rate
        if rate is None:
            return most
        return max(MIN_BURST, min(most, int(rate * BURST_S / stride)))
