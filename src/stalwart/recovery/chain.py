"""Chain replication of one shard: K server processes, updates flowing head to tail.

Every replica is the same deterministic state machine (sync policy + optimizer over
the shard), fed the same ordered log of entries: a worker's push, its first offer of
parameters (``init``), its departure (``leave``). The head gives each entry the next
log sequence number (lsn) and the wall time at which it happened (so that timing-based
policies decide identically everywhere), applies it, and sends it on; every replica
applies what it receives, in lsn order, and sends it on to its own successor.

**Strong mode.** An entry is acknowledged upstream only once the tail has applied it:
the tail acks at once, a middle replica when its successor has acked, and the head
answers the worker then. So an update a worker saw acknowledged is held by every
replica of the chain, and losing any one replica loses none of them. Workers pull
from the tail. Each replica keeps the entries it sent but has not had acknowledged;
when its successor dies it reconnects to the next one and resends them, and the
receiver drops what it already has (lsn at or below its own). A worker whose head
died resends its unacknowledged push to the new head, which recognizes it by
(worker, push sequence) and acknowledges it without applying it twice.

**Relaxed mode** (as the paper did). The head acknowledges a push as soon as it has
applied it and sends its whole state down the chain every ``every_updates`` updates;
a failover loses the updates since the last state sent.

**Repair.** A replica that loses its successor reports it to the coordinator, which
confirms the death by probing and bumps the chain's epoch; the replica then reads the
new chain and connects to its new successor (or, if it is now the tail, acknowledges
everything it holds). A restarted process joins at the tail: it asks the tail for a
state transfer, the tail sends its state and from then on forwards every entry to it,
and once installed it tells the coordinator, which appends it to the chain.

**Membership as last read.** A replica reads its chain from the coordinator when the
coordinator's epoch moves (heartbeat replies carry it; :meth:`ChainRecovery._maintain`
watches it), never on the update path. That is safe because the one change that adds
a successor behind a replica goes through that replica first (a joiner is adopted, and
becomes its successor link, before the coordinator appends it), and a replica acts as
the tail only while the chain it last read was fully formed: before that, entries
wait for the successor the formation will give it.

The strategy acts on its shard through :class:`~stalwart.shard.ShardState` only: an
entry from upstream is applied with the same ``apply_*`` a head uses, and a state
transfer is one encoded :class:`~stalwart.shard.Snapshot` with the log position and
the dedupe table beside it.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from ..control import CoordinatorClient, CoordinatorError
from ..shard import Snapshot, SnapshotError
from ..sync import SyncError
from ..transport import Connection, ConnectionClosed, Flag, Frame, Kind, ProtocolError, dial
from ..transport.service import Refused, Session
from .base import Ack, AckAt, Entry, Op, RecoveryStrategy

REPAIR_POLL_S = 0.1


class ChainMode(enum.StrEnum):
    STRONG = "strong"    # acknowledged once the tail holds it; pulls at the tail
    RELAXED = "relaxed"  # acknowledged at the head; state sent down every few updates


class Member(NamedTuple):
    """One replica of the chain as the coordinator lists it, head first."""
    index: int
    address: str


class Applied(NamedTuple):
    """A worker's last push that the chain holds: its push sequence, the log position
    the head gave it, and the shard's version after it (what a resend is told)."""
    seq: int
    lsn: int
    version: int


@dataclass
class Record:
    """An entry applied here and sent (or to be sent) downstream, not yet acknowledged."""
    lsn: int
    frame: Frame                      # REPLICATE frame as sent downstream
    payload: bytes | None
    waiters: list[Ack] = field(default_factory=list)  # run once durable


@dataclass
class Link:
    """Our connection to our successor; ``broken`` once a send or a read on it failed."""
    index: int
    conn: Connection
    broken: bool = False


class ChainRecovery(RecoveryStrategy):
    """One replica's part in its shard's chain: the log, the dedupe table, the link to
    its successor and its repair. The server calls in; two threads send out."""

    name = "chain"
    owns = frozenset({Kind.REPLICATE, Kind.REPLICATE_ACK, Kind.STATE, Kind.REQUEST})
    fresh_payloads = frozenset({Kind.STATE})

    def __init__(self, index: int, control: CoordinatorClient, token: bytes, transport: str,
                 mode: ChainMode | str = ChainMode.STRONG, every_updates: int = 100):
        self.index, self.control, self.token, self.transport = index, control, token, transport
        self.mode, self.every_updates = ChainMode(mode), every_updates
        self.last_lsn = 0
        self.dedupe: dict[int, Applied] = {}  # worker -> its last push the chain holds
        self.outbox: deque[Record] = deque()  # applied here, not yet acked by the successor
        self.members: list[Member] = []       # the chain as last read, head first
        self.formed = False                   # ...and whether it was complete then
        self.successor: Link | None = None
        self._sent_upto = 0
        self._cond = threading.Condition()    # guards outbox, successor, _sent_upto
        self._wake = threading.Event()
        self._closed = False
        self._last_state_version = 0
        control.rejoin_extra = self.rejoin_view

    def rejoin_view(self) -> dict:
        """What a coordinator that lost its state learns from this replica: its chain."""
        return {"chain": [[m.index, m.address] for m in self.members], "formed": self.formed}

    def max_payload(self) -> int:
        # A whole-state transfer: parameters, optimizer and policy arrays, and a header.
        return 6 * self.shard.nbytes + (1 << 20)

    # --- position in the chain ------------------------------------------------------
    def refresh(self) -> None:
        try:
            # No waiting: while no coordinator answers, the chain as last read stands.
            reply = self.control.call("chain", patience_s=0.0, shard=self.shard.shard)
        except CoordinatorError:
            return
        self.members = [Member(int(i), str(a)) for i, a in reply["members"]]
        self.formed = bool(reply.get("formed", True))

    def position(self) -> tuple[int | None, Member | None]:
        """(my place, my successor) in the chain as last read."""
        indices = [m.index for m in self.members]
        if self.index not in indices:
            return None, None
        at = indices.index(self.index)
        return at, (self.members[at + 1] if at + 1 < len(self.members) else None)

    def is_head(self) -> bool:
        at, _ = self.position()
        if at != 0:
            self.refresh()  # a worker came to us: perhaps the head died and we lead now
            at, _ = self.position()
            if at == 0:
                self._changed("became_head")
        return at == 0

    def _tail_as_last_read(self) -> bool:
        return self.formed and self.position()[1] is None

    # --- the server's hooks -----------------------------------------------------------
    def redirect(self) -> str | None:
        if self.is_head():
            return None
        return f"server {self.index} is not the head of shard {self.shard.shard}'s chain"

    def applied_before(self, frame: Frame, ack_at: AckAt) -> bool:
        seen = self.dedupe.get(frame.worker)
        if seen is None or seen.seq != frame.seq:
            return False
        # A resend of a push we hold (the worker lost our predecessor as head).
        self.wait_durable(seen.lsn, ack_at(seen.version))
        return True

    def commit(self, entry: Entry, ack: Ack | None) -> Ack | None:
        """At the head: give the entry the next lsn and send it down the chain."""
        f = entry.frame
        self.last_lsn += 1
        down = Frame(Kind.REPLICATE, shard=self.shard.shard, worker=f.worker, seq=self.last_lsn, clock=f.clock,
                     meta={"op": entry.op.value, "wseq": f.seq, "now": entry.now,
                           **({"hint": entry.hint} if entry.hint else {})})
        if entry.op == Op.PUSH:
            self.dedupe[f.worker] = Applied(f.seq, self.last_lsn, self.shard.version)
        self._append(down, None if entry.payload is None else entry.payload.tobytes(), ack)
        self._maybe_send_state()
        return None

    def holds(self, frame: Frame) -> bool:
        """Read your writes: on a strong chain's tail, a pull that follows a push waits
        until that push has come down the chain."""
        if self.mode != ChainMode.STRONG or not frame.flags & Flag.AFTER_PUSH:
            return True
        seen = self.dedupe.get(frame.worker)
        return seen is not None and seen.seq == frame.seq

    def on_frame(self, session: Session, frame: Frame) -> None:
        if frame.kind == Kind.REPLICATE_ACK:
            self.on_ack(frame.lsn)
        elif frame.kind == Kind.REPLICATE:
            self._apply_upstream(session, frame)
        elif frame.kind == Kind.STATE:
            with self.shard.lock:
                self._install(frame)
                self._forward_state(frame, bytes(frame.payload))
            self.log.emit("state_installed", shard=self.shard.shard, version=self.shard.version, lsn=self.last_lsn)
        elif (frame.meta or {}).get("op") == "chain_join":
            self._on_join_request(session, frame)
        else:
            raise ProtocolError(f"a chain replica does not accept {frame.kind.name} "
                                f"{(frame.meta or {}).get('op')!r} requests")

    def on_disconnect(self, session: Session) -> None:
        if session.data.get("successor"):
            with self._cond:
                link = self.successor
            if link is not None and link.conn is session.conn:
                self._broken(link)

    def stats(self) -> dict:
        return {"chain_lsn": self.last_lsn}

    # --- entries from our predecessor -------------------------------------------------
    def _apply_upstream(self, session: Session, frame: Frame) -> None:
        shard, meta, lsn = self.shard, frame.meta or {}, frame.lsn

        def ack_upstream() -> None:
            try:
                session.conn.send(Frame(Kind.REPLICATE_ACK, shard=shard.shard, seq=lsn))
            except (ConnectionError, OSError):
                pass  # our predecessor died; its predecessor will resend to us
        try:
            op = Op(meta.get("op"))
        except ValueError:
            raise ProtocolError(f"unknown chain entry {meta.get('op')!r}") from None
        payload = shard.checked(frame) if op in (Op.PUSH, Op.INIT) else None
        with shard.lock:
            if lsn <= self.last_lsn:
                return self.wait_durable(lsn, ack_upstream)  # a resend after a repair
            if lsn != self.last_lsn + 1:
                raise ProtocolError(f"chain entry {lsn} after {self.last_lsn}: entries are missing")
            now = float(meta.get("now", 0.0))
            try:
                if op == Op.PUSH:
                    shard.apply_push(frame.worker, frame.clock, payload, now, None, meta.get("hint"))
                    self.dedupe[frame.worker] = Applied(meta.get("wseq"), lsn, shard.version)
                elif op == Op.INIT:
                    shard.apply_init(frame.worker, payload)
                else:
                    shard.apply_leave(frame.worker, now)
            except SyncError as exc:
                # Replicas apply the head's log in the head's order; a refusal here
                # means the states diverged. Say so loudly; the entry still counts.
                self.log.emit("chain_diverged", shard=shard.shard, lsn=lsn, reason=str(exc))
            self.last_lsn = lsn
            shard.lock.notify_all()  # a pull may wait for this very push (read your writes)
            decisions = shard.policy.drain_events()
            self._append(frame, None if payload is None else payload.tobytes(), ack_upstream)
        shard.log_decisions(decisions)

    def _append(self, frame: Frame, payload: bytes | None, waiter: Ack | None) -> None:
        """Queue an entry just applied here (the shard's lock held) for our successor; on
        the tail, or in relaxed mode, it is durable once applied."""
        if self.mode == ChainMode.STRONG:
            with self._cond:
                if self.successor is not None or not self._tail_as_last_read():
                    self.outbox.append(Record(frame.lsn, frame, payload, [waiter] if waiter else []))
                    self._cond.notify_all()
                    if self.successor is None:
                        self._wake.set()  # the maintainer links us up (or finds us the tail)
                    return
        if waiter is not None:
            waiter()

    def wait_durable(self, lsn: int, waiter: Ack) -> None:
        """Run ``waiter`` once entry ``lsn`` (already applied) is acknowledged."""
        with self._cond:
            for record in self.outbox:
                if record.lsn == lsn:
                    record.waiters.append(waiter)
                    return
        waiter()  # not pending: already durable

    def on_ack(self, lsn: int) -> None:
        fire = []
        with self._cond:
            while self.outbox and self.outbox[0].lsn <= lsn:
                fire += self.outbox.popleft().waiters
        for w in fire:
            w()

    # --- whole-state transfer -----------------------------------------------------------
    def _state_frame(self) -> tuple[Frame, bytes]:
        """The shard's whole state, our lsn and the dedupe table as one STATE frame (lock held)."""
        dedupe = [[w, *applied] for w, applied in self.dedupe.items()]
        return (Frame(Kind.STATE, shard=self.shard.shard, seq=self.last_lsn,
                      meta={"lsn": self.last_lsn, "dedupe": dedupe}), self.shard.snapshot().to_bytes())

    def _install(self, frame: Frame) -> None:
        """Take over the state a STATE frame carries (lock held)."""
        meta = frame.meta or {}
        try:
            snap = Snapshot.decode(frame.payload, self.shard.shard)
            lsn, dedupe = int(meta["lsn"]), {int(w): Applied(*rest) for w, *rest in meta["dedupe"]}
            self.shard.restore(snap)
        except (SnapshotError, KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"a state transfer that cannot be installed: {exc}") from None
        self.last_lsn, self.dedupe = lsn, dedupe

    def _maybe_send_state(self) -> None:
        """Relaxed mode, at the head (lock held): the whole state every ``every_updates`` updates."""
        if self.mode != ChainMode.RELAXED or self.shard.version - self._last_state_version < self.every_updates:
            return
        self._last_state_version = self.shard.version
        self._forward_state(*self._state_frame())

    def _forward_state(self, frame: Frame, payload: bytes) -> None:
        """Send a whole state on down the chain (relaxed mode)."""
        with self._cond:
            link = self.successor
        if link is not None and self.mode == ChainMode.RELAXED:
            try:
                link.conn.send(frame, payload)
            except (ConnectionError, OSError):
                self._broken(link)

    # --- joining -----------------------------------------------------------------------
    def start(self) -> None:
        """Join the chain (at once for a member of the first one), then keep the link."""
        self._join()
        threading.Thread(target=self._maintain, name="chain-maintain", daemon=True).start()
        threading.Thread(target=self._sender, name="chain-send", daemon=True).start()

    def _on_join_request(self, session: Session, frame: Frame) -> None:
        index = (frame.meta or {}).get("index")
        reason = self._why_not_adopt()
        if reason is not None or type(index) is not int:
            raise Refused(reason or "chain_join needs an integer index", retry=True)
        session.data["successor"] = True
        with self.shard.lock:
            state, payload = self._state_frame()
            session.conn.send(state, payload)
            with self._cond:
                self._set_successor(Link(index, session.conn))
        self.log.emit("chain_joiner_adopted", shard=self.shard.shard, joiner=index, lsn=self.last_lsn)

    def _why_not_adopt(self) -> str | None:
        """Why a joiner cannot attach behind us now (None: it can)."""
        self.refresh()
        at, successor = self.position()
        if at is None or successor is not None:
            return f"server {self.index} is not the tail of shard {self.shard.shard}'s chain"
        with self._cond:
            if self.successor is not None and not self.successor.broken:
                return f"server {self.index} is already handing its state to another replica"
        return None

    def _join(self, timeout_s: float = 60.0) -> None:
        """Not in the chain: copy the tail's state, follow it, and be appended."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._closed:
            self.refresh()
            read_at = self.control.epoch
            if self.position()[0] is not None:
                return  # in the chain already (the first formation)
            if not self.members:
                time.sleep(0.05)  # the chain is still forming
                continue
            tail = self.members[-1]
            try:
                conn = dial(tail.address, self.token, self.transport, timeout=2.0, max_payload=self.max_payload())
                conn.send(Frame(Kind.REQUEST, shard=self.shard.shard, meta={"op": "chain_join", "index": self.index}))
                first = conn.recv()
            except (OSError, ProtocolError, ConnectionError):
                time.sleep(0.05)  # the tail is changing: read the chain again
                continue
            if first.kind != Kind.STATE:
                conn.close()
                time.sleep(0.05)
                continue
            with self.shard.lock:
                self._install(first)
            self.log.emit("state_installed", shard=self.shard.shard, version=self.shard.version,
                          lsn=self.last_lsn, source=tail.index)
            # From now on the tail forwards every entry to us on this connection.
            threading.Thread(target=self.serve, args=(conn,), daemon=True, name="chain-up").start()
            try:
                self.control.call("chain_join", index=self.index, epoch=read_at)
            except CoordinatorError as exc:
                # Refused as stale (a new coordinator since we read the chain) or none
                # answered: the tail we copied may not be the tail now. Start over.
                self.log.emit("chain_join_refused", shard=self.shard.shard, reason=str(exc))
                conn.close()
                continue
            self.refresh()
            return
        raise RuntimeError(f"server {self.index} could not join shard {self.shard.shard}'s chain in {timeout_s}s")

    # --- successor management -----------------------------------------------------------
    def _broken(self, link: Link) -> None:
        link.broken = True
        link.conn.close()
        self._wake.set()

    def _set_successor(self, link: Link | None) -> None:
        """Caller holds _cond. Everything not yet acked is (re)sent to the new successor;
        with none, we are the tail and everything we hold is durable."""
        old, self.successor = self.successor, link
        self._sent_upto = self.outbox[0].lsn - 1 if self.outbox else self.last_lsn
        if old is not None and (link is None or old.conn is not link.conn):
            old.conn.close()
        fire = []
        if link is None:
            fire = [w for r in self.outbox for w in r.waiters]
            self.outbox.clear()
        self._cond.notify_all()
        for w in fire:
            w()

    def _maintain(self) -> None:
        """Keep our successor link matching the chain; repair it when it breaks."""
        seen_epoch = -1
        while not self._closed:
            woke = self._wake.wait(REPAIR_POLL_S)
            self._wake.clear()
            if self._closed:
                return
            if not woke and self.control.epoch == seen_epoch:
                continue
            seen_epoch = self.control.epoch
            with self._cond:
                link = self.successor
            if link is not None and link.broken:
                try:
                    self.control.call("suspect", index=link.index, reporter=f"server {self.index}")
                except CoordinatorError:
                    pass
            self.refresh()
            at, wanted = self.position()
            if at is None:
                continue  # not in the chain: removed, or a joiner not yet appended
            if wanted is None:
                if not self.formed:
                    continue  # the first chain is still forming: our successor is yet to come
                # We are the tail. A joiner not yet appended stays our successor while alive.
                joiner = link is not None and not link.broken and link.index not in [m.index for m in self.members]
                if link is not None and not joiner:
                    with self._cond:
                        self._set_successor(None)
                    self._changed("became_tail")
                elif link is None and self.outbox:
                    with self._cond:
                        self._set_successor(None)  # entries queued while the chain formed
                continue
            if link is not None and link.index == wanted.index and not link.broken:
                continue
            try:
                conn = dial(wanted.address, self.token, self.transport, timeout=2.0,
                            max_payload=self.max_payload())
            except (OSError, ProtocolError, ConnectionError):
                self._wake.set()  # not up yet, or dead and about to be removed: try again
                time.sleep(0.02)  # back off a little before the retry
                continue
            new = Link(wanted.index, conn)
            with self._cond:
                self._set_successor(new)
            threading.Thread(target=self._ack_reader, args=(new,), daemon=True, name="chain-acks").start()
            self._changed("new_successor")
            if self.mode == ChainMode.RELAXED:
                with self.shard.lock:
                    state = self._state_frame()
                self._forward_state(*state)  # the new successor starts from our state

    def _changed(self, why: str) -> None:
        self.shard.note_interruption(why)
        self.log.emit("chain_changed", shard=self.shard.shard, why=why,
                      chain=[m.index for m in self.members], epoch=self.control.epoch)

    def _sender(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not (self.successor is not None and not self.successor.broken
                                                 and self.outbox and self.outbox[-1].lsn > self._sent_upto):
                    self._cond.wait()
                if self._closed:
                    return
                link = self.successor
                batch = [r for r in self.outbox if r.lsn > self._sent_upto]
                self._sent_upto = batch[-1].lsn
            try:
                for r in batch:
                    link.conn.send(r.frame, r.payload)
            except (ConnectionError, OSError):
                self._broken(link)

    def _ack_reader(self, link: Link) -> None:
        try:
            while True:
                frame = link.conn.recv()
                if frame.kind == Kind.ERROR:
                    raise ProtocolError((frame.meta or {}).get("reason", "error"))
                if frame.kind != Kind.REPLICATE_ACK:
                    raise ProtocolError(f"successor {link.index} sent {frame.kind.name}")
                self.on_ack(frame.lsn)
        except (ConnectionError, OSError, ProtocolError, ConnectionClosed) as exc:
            if not self._closed:
                self.log.emit("chain_link_lost", shard=self.shard.shard, successor=link.index, reason=str(exc))
                self._broken(link)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        with self._cond:
            self._cond.notify_all()
            if self.successor is not None:
                self.successor.conn.close()
