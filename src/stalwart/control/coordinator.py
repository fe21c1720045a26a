"""The coordinator: the job's control plane, kept apart from the data plane.

It knows who is in the job (membership with leases renewed by heartbeats), which
server holds which shard (the shard map, with an epoch that changes whenever the map
does), and what state the job is in (``running`` -> ``stopping`` -> ``shutdown``).
Gradients and parameters never pass through it: if it is slow, training is not.

Every request is a REQUEST frame whose meta holds ``op`` and its arguments; the
reply's meta holds the result or ``error``. The ops are the methods ``op_*`` below.

With chain replication each shard is served by ``replicas`` server processes (process
``i`` serves shard ``i // replicas``) in a chain whose order the coordinator keeps,
with the epoch. A replica is removed when its lease expires or, much sooner, when a
neighbour or a worker whose connection to it broke reports it (``suspect``) and a
probe confirms that nothing answers at its address. A process that registers for a
shard whose chain is already formed is not in it until it has copied the tail's state
and says so (``chain_join``); then it becomes the new tail.

The coordinator's own state lives only in its memory: if it dies, the job stops (the
driver names it), because membership and chain order cannot be rebuilt safely.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..metrics import EventLog
from ..transport import Frame, Kind, ProtocolError
from ..transport.base import Listener
from ..transport.service import FrameService, Session

JOB_STATES = ("running", "stopping", "shutdown")
PROBE_TIMEOUT_S = 0.2


def _answers(address: str) -> bool:
    """Does anything accept a connection at ``address``? (A SIGKILLed server does not.)"""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


@dataclass
class Member:
    role: str
    index: int
    address: str | None
    pid: int | None
    last_seen: float
    alive: bool = True
    stats: dict[str, Any] = field(default_factory=dict)


class Coordinator(FrameService):
    """The job's control plane in one process: membership with leases, the shard map and
    the chains with their epoch, and the job's state, behind REQUEST ops (``op_*``).

    ``servers`` counts shards and ``replicas`` the server processes per shard (1 without
    chains); ``lease_s`` is how long a member may stay silent before it is dropped, which
    :meth:`run` checks every tick. ``pulls_at_tail`` makes the map send pulls to each
    chain's tail (strong chains) rather than its head.
    """

    def __init__(self, listener: Listener, token: bytes, log: EventLog, *, servers: int,
                 workers: int, lease_s: float, replicas: int = 1, pulls_at_tail: bool = True):
        super().__init__(listener, token, log)
        # ``servers`` counts shards; there are ``servers * replicas`` server processes.
        self.servers, self.workers, self.lease_s, self.replicas = servers, workers, lease_s, replicas
        self.chains: dict[int, list[int]] = {}   # shard -> server process indices, head first
        # Strong chains serve pulls at the tail; relaxed ones (whose tail lags by design) at the head.
        self.pulls_at_tail = pulls_at_tail
        self.formed: set[int] = set()             # shards whose first chain is complete
        self.members: dict[tuple[str, int], Member] = {}
        self.state = "running"
        self.stop_reason: str | None = None
        self.epoch = 0
        self._cond = threading.Condition()
        self._shutdown = threading.Event()

    # --- wire --------------------------------------------------------------------
    def handle(self, session: Session, frame: Frame) -> None:
        if frame.kind != Kind.REQUEST or not frame.meta or not isinstance(frame.meta.get("op"), str):
            raise ProtocolError(f"coordinator expects REQUEST frames with an 'op', got {frame.kind.name}")
        args = dict(frame.meta)
        op = args.pop("op")
        method = getattr(self, f"op_{op}", None)
        if method is None:
            reply = {"error": f"unknown op {op!r}"}
        else:
            try:
                reply = method(**args)
            except TypeError as exc:
                reply = {"error": f"bad arguments for {op!r}: {exc}"}
        session.conn.send(Frame(Kind.REPLY, meta=reply))
        if self.state == "shutdown":
            # Only once the reply is out: the serving loop closes every connection then,
            # and the one who asked must not see its connection cut instead of the answer.
            self._shutdown.set()

    # --- ops ---------------------------------------------------------------------
    def op_register(self, role: str, index: int, address: str | None = None,
                    pid: int | None = None) -> dict:
        limit = {"server": self.servers * self.replicas, "worker": self.workers}.get(role)
        if limit is not None and not 0 <= index < limit:
            return {"error": f"{role} index {index} is outside this job (0..{limit - 1})"}
        with self._cond:
            self.members[(role, index)] = Member(role, index, address, pid, time.monotonic())
            if role == "server":
                shard = index // self.replicas
                chain = self.chains.setdefault(shard, [])
                if index in chain:
                    chain.remove(index)  # a restarted process rejoins like a new one
                if self.replicas == 1:
                    chain[:] = [index]   # no chain: the one server of the shard, whatever its past
                    self.formed.add(shard)
                elif shard not in self.formed:
                    chain.append(index)
                    chain.sort()
                    if len(chain) == self.replicas:
                        self.formed.add(shard)
                self.epoch += 1
            self._cond.notify_all()
        self.log.emit("member_joined", member_role=role, member_index=index, address=address, pid=pid)
        return {"state": self.state, "epoch": self.epoch, "lease_s": self.lease_s}

    def op_heartbeat(self, role: str, index: int, stats: dict | None = None) -> dict:
        with self._cond:
            member = self.members.get((role, index))
            if member is None:
                return {"error": f"{role} {index} is not registered"}
            member.last_seen = time.monotonic()
            member.alive = True
            if stats:
                member.stats = stats
            return {"state": self.state, "epoch": self.epoch}

    def op_shard_map(self, wait_s: float = 0.0) -> dict:
        """Server addresses by shard, once every shard has a server (waits up to wait_s)."""
        deadline = time.monotonic() + min(float(wait_s), 60.0)
        with self._cond:
            while not self._map_complete() and self.state == "running":
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if not self._map_complete():
                return {"ready": False, "state": self.state, "epoch": self.epoch}
            # Pushes go to each chain's head, pulls to its tail (the same server without chains).
            ends = [(self.chains[s][0], self.chains[s][-1 if self.pulls_at_tail else 0]) for s in range(self.servers)]
            return {"ready": True, "epoch": self.epoch, "state": self.state,
                    "shards": [self.members[("server", h)].address for h, _ in ends],
                    "tails": [self.members[("server", t)].address for _, t in ends]}

    def op_chain(self, shard: int) -> dict:
        """The chain of ``shard``: process indices and addresses, head first."""
        with self._cond:
            return {"epoch": self.epoch, "state": self.state, "formed": shard in self.formed,
                    "members": [[i, self.members[("server", i)].address] for i in self.chains.get(shard, [])]}

    def op_suspect(self, index: int | None = None, address: str | None = None, reporter: str = "?") -> dict:
        """Someone lost its connection to a server (by index or address): remove it from
        its chain if nothing answers there."""
        with self._cond:
            if index is None:
                index = next((m.index for m in self.members.values()
                              if m.role == "server" and m.address == address and address), None)
                if index is None:
                    return {"removed": False, "epoch": self.epoch}
            member = self.members.get(("server", index))
            address = member.address if member is not None else None
        if address is not None and _answers(address):
            return {"removed": False, "epoch": self.epoch}
        removed = self._remove_replica(index, f"reported by {reporter}")
        return {"removed": removed, "epoch": self.epoch}

    def op_chain_join(self, index: int) -> dict:
        """Server ``index`` holds its tail's state and is forwarded every update: append it."""
        shard = index // self.replicas
        with self._cond:
            chain = self.chains.setdefault(shard, [])
            if index not in chain:
                chain.append(index)
                self.epoch += 1
                self._cond.notify_all()
            members = list(chain)
        self.log.emit("replica_joined", shard=shard, member_index=index, chain=members, epoch=self.epoch)
        return {"epoch": self.epoch}

    def _remove_replica(self, index: int, why: str) -> bool:
        shard = index // self.replicas
        with self._cond:
            chain = self.chains.get(shard, [])
            if index not in chain or self.replicas == 1:
                return False
            chain.remove(index)
            member = self.members.get(("server", index))
            if member is not None:
                member.alive = False
            self.epoch += 1
            self._cond.notify_all()
            members = list(chain)
        self.log.emit("replica_removed", shard=shard, member_index=index, chain=members, epoch=self.epoch,
                      why=why)
        return True

    def op_status(self) -> dict:
        with self._cond:
            members = [{"role": m.role, "index": m.index, "alive": m.alive, "stats": m.stats,
                        "address": m.address} for m in self.members.values()]
            return {"state": self.state, "epoch": self.epoch, "members": members,
                    "chains": [list(self.chains.get(s, [])) for s in range(self.servers)],
                    "stop_reason": self.stop_reason}

    def op_stop(self, reason: str = "requested") -> dict:
        return self._set_state("stopping", reason)

    def op_shutdown(self, reason: str = "requested") -> dict:
        return self._set_state("shutdown", reason)  # the loop stops once this is answered

    # --- internals ---------------------------------------------------------------
    def _map_complete(self) -> bool:
        return all(s in self.formed and self.chains.get(s) and
                   all(self.members[("server", i)].alive for i in self.chains[s]) for s in range(self.servers))

    def _set_state(self, state: str, reason: str) -> dict:
        with self._cond:
            if JOB_STATES.index(state) > JOB_STATES.index(self.state):
                self.state = state
                self.stop_reason = self.stop_reason or reason
                self._cond.notify_all()
                self.log.emit("job_state", state=state, reason=reason)
            return {"state": self.state}

    def _check_leases(self) -> None:
        now = time.monotonic()
        with self._cond:
            expired = [m for m in self.members.values() if m.alive and now - m.last_seen > self.lease_s]
            for m in expired:
                m.alive = False
            if expired:
                self._cond.notify_all()
        for m in expired:
            self.log.emit("member_lost", member_role=m.role, member_index=m.index,
                          silent_s=round(now - m.last_seen, 3))
            if m.role == "server":
                self._remove_replica(m.index, "lease expired")

    def run(self, tick_s: float) -> None:
        """Serve until shut down, expiring leases every tick."""
        self.start()
        self.log.emit("coordinator_start", address=self.address)
        while not self._shutdown.wait(tick_s):
            self._check_leases()
        self.log.emit("coordinator_stop", reason=self.stop_reason)
        self.close()
