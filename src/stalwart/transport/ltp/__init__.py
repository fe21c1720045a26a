"""LTP: a loss-tolerant transport for gradient pushes (after arXiv 2305.04279).

When many workers push to one server at once (incast), a shallow switch buffer
overflows; TCP then waits for retransmissions, and the slowest flow sets the pace of
the whole synchronization round. Gradient descent does not need every byte of every
gradient. LTP lets a bounded fraction of a push be lost and closes rounds early:

- **Placement in any order** (:mod:`.packet`): every UDP packet carries job, session,
  round, shard, sequence number, byte offset, length and the frame's length; the
  receiver writes it straight into the round's buffer and keeps a bitmap.
- **Selective ACKs** (bitmaps) and **must-arrive packets**: the first and last packet
  of a round are retransmitted until acknowledged; the round's start and metadata go
  on the connection's reliable TCP stream, in order with pulls and control messages.
- **Early Close** (:class:`.round.EarlyClose`): close once the last packet is in and a
  short reorder grace has passed, or at an adaptive deadline (``slack`` x the recent
  arrival span of a whole round), but never below ``min_fraction`` received: then
  the receiver asks for what is missing and the round completes by retransmission.
- **Bubble Filling** (:func:`.round.fill`): lost ranges become zeros with the rest
  rescaled, plain zeros, or the sender's previous values; optionally a randomized
  Hadamard rotation (:mod:`.hadamard`) spreads a lost packet over a whole block.
  The lost fraction of every round is returned with its frame (the server logs it).
- **Pacing, not loss, as congestion signal** (:mod:`.pacing`): BBR-like, from the
  delivery rate the receiver measures.
- **Batches, not packets, in Python** (:mod:`.udp`): GSO sends and GRO receives of
  up to 64 KiB, and NumPy over the packet headers.

Chosen with ``--transport ltp``; settings in the ``ltp:`` section of the job config
(:class:`.config.LtpConfig`), all decided by the server and told to clients
in the handshake.
"""

from .config import LtpConfig
from .transport import LtpClientConnection, LtpListener, LtpServerConnection, LtpTransport

__all__ = ["LtpClientConnection", "LtpConfig", "LtpListener", "LtpServerConnection", "LtpTransport"]
