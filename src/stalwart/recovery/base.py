"""The recovery-strategy interface: what a server asks the strategy that keeps its shard alive.

The server owns the wire (frames, validation, the sync gate) and applies every
worker's request to its :class:`~stalwart.shard.ShardState` as one log entry. What
happens around that is a strategy's, through a few hooks the server calls:

* **admit**: :meth:`redirect` says why this server takes no workers' updates (a chain
  replica that is not the head), and :meth:`applied_before` answers a resend of an
  update the shard already holds, without applying it twice;
* **apply**: :meth:`init` applies a worker's INIT (a stateless server first collects
  the workers' copies to rebuild from); :meth:`commit` gets every entry right after it
  was applied, with the worker's acknowledgement, and decides when that goes out (a
  strong chain sends it once the tail holds the entry);
* **read your writes**: :meth:`holds` says whether a pull that follows a push may be
  answered yet;
* **own frames**: the kinds in :attr:`owns` (a chain's REPLICATE, REPLICATE_ACK, STATE
  and join requests; stateless FLUSH) go to :meth:`on_frame`;
* **lifecycle**: :meth:`recover` before the server serves (load a checkpoint),
  :meth:`start` once it is registered (join a chain), :meth:`close`; :meth:`stats`.

Every hook that takes an entry or a frame under the shard's lock says so. A strategy
acts on the shard through ``ShardState`` alone, never through the server.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..metrics import EventLog
from ..shard import ShardState
from ..transport import Connection, Frame, Kind
from ..transport.service import Refused, Session

Ack = Callable[[], None]           # sends a worker's acknowledgement
AckAt = Callable[[int], Ack]       # the acknowledgement of the request at hand, naming a version
Serve = Callable[[Connection], None]  # the server's frame loop, for a connection dialed out


class Op(enum.StrEnum):
    """The log entries every replica of a shard applies in the same order."""
    INIT = "init"
    PUSH = "push"
    LEAVE = "leave"


@dataclass
class Entry:
    """One applied log entry, as a strategy sees it in :meth:`RecoveryStrategy.commit`."""
    op: Op
    frame: Frame                 # the worker's request (for ``leave``: a DONE naming the worker)
    payload: np.ndarray | None   # the values it carried (views of the receive buffer)
    now: float                   # the wall time the head stamped into it
    hint: dict | None = None     # what the worker relayed from the sync leader


# Which strategy handles each frame kind that only some strategies handle.
OWNERS = {Kind.FLUSH: "stateless", Kind.REPLICATE: "chain", Kind.REPLICATE_ACK: "chain", Kind.STATE: "chain"}


class RecoveryStrategy:
    """No recovery: a dead server's shard is lost. The base of every strategy."""

    name = "none"
    owns: frozenset[Kind] = frozenset()
    fresh_payloads: frozenset[Kind] = frozenset()  # owned kinds whose payload needs a buffer of its own

    def bind(self, shard: ShardState, serve: Serve, log: EventLog) -> None:
        """Called once by the server that this strategy keeps alive."""
        self.shard, self.serve, self.log = shard, serve, log

    def max_payload(self) -> int:
        """The largest payload a peer may send this server."""
        return self.shard.nbytes

    # --- admitting and applying a worker's request ---------------------------------
    def redirect(self) -> str | None:
        """Why this server takes no workers' updates (sent with a redirect), or None."""
        return None

    def applied_before(self, frame: Frame, ack_at: AckAt) -> bool:
        """A push the shard may already hold (a resend): True if answered here. Lock held."""
        return False

    def init(self, frame: Frame, values: np.ndarray, offered_version: int | None) -> int:
        """Apply a worker's INIT; returns the clock it continues from. Lock held."""
        return self.shard.apply_init(frame.worker, values)

    def commit(self, entry: Entry, ack: Ack | None) -> Ack | None:
        """``entry`` was just applied (lock held). Returns the acknowledgement to send once
        the lock is let go, or None where the strategy sends it itself, later."""
        return ack

    def holds(self, frame: Frame) -> bool:
        """May this pull, which follows the same worker's push, be answered now? Lock held."""
        return True

    # --- frames of its own ------------------------------------------------------------
    def on_frame(self, session: Session, frame: Frame) -> None:
        """A frame of a kind in :attr:`owns`."""
        raise Refused(self.refusal(frame.kind))

    def refusal(self, kind: Kind) -> str:
        owner = OWNERS.get(kind)
        if owner is None:
            return f"a server does not accept {kind.name} frames"
        return f"{kind.name} needs {owner} recovery; this server is not {owner} (recovery {self.name})"

    def on_disconnect(self, session: Session) -> None:
        """A connection ended."""

    # --- lifecycle ------------------------------------------------------------------
    def recover(self) -> None:
        """Before the server serves: take up whatever state survived (a checkpoint)."""

    def start(self) -> None:
        """Once the server is registered with the coordinator."""

    def close(self) -> None:
        """The server is stopping."""

    def stats(self) -> dict:
        return {}
