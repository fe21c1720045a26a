"""The coordinator: the job's control plane, kept apart from the data plane.

It knows who is in the job (membership with leases renewed by heartbeats), which
server holds which shard (the shard map, with an epoch that changes whenever the map
does), and what state the job is in (``running`` -> ``stopping`` -> ``shutdown``).
Gradients and parameters never pass through it: if it is slow, training is not.

Every request is a REQUEST frame whose meta holds ``op`` and its arguments; the
reply's meta holds the result or ``error``. The ops are the methods ``op_*`` below.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..metrics import EventLog
from ..transport import Frame, Kind, ProtocolError
from ..transport.base import Listener
from ..transport.service import FrameService, Session

JOB_STATES = ("running", "stopping", "shutdown")


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
    def __init__(self, listener: Listener, token: bytes, log: EventLog, *, servers: int,
                 workers: int, lease_s: float):
        super().__init__(listener, token, log)
        self.servers, self.workers, self.lease_s = servers, workers, lease_s
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

    # --- ops ---------------------------------------------------------------------
    def op_register(self, role: str, index: int, address: str | None = None,
                    pid: int | None = None) -> dict:
        limit = {"server": self.servers, "worker": self.workers}.get(role)
        if limit is not None and not 0 <= index < limit:
            return {"error": f"{role} index {index} is outside this job (0..{limit - 1})"}
        with self._cond:
            self.members[(role, index)] = Member(role, index, address, pid, time.monotonic())
            if role == "server":
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
            shards = [self.members[("server", s)].address for s in range(self.servers)]
            return {"ready": True, "shards": shards, "epoch": self.epoch, "state": self.state}

    def op_status(self) -> dict:
        with self._cond:
            members = [{"role": m.role, "index": m.index, "alive": m.alive, "stats": m.stats,
                        "address": m.address} for m in self.members.values()]
            return {"state": self.state, "epoch": self.epoch, "members": members,
                    "stop_reason": self.stop_reason}

    def op_stop(self, reason: str = "requested") -> dict:
        return self._set_state("stopping", reason)

    def op_shutdown(self, reason: str = "requested") -> dict:
        reply = self._set_state("shutdown", reason)
        self._shutdown.set()
        return reply

    # --- internals ---------------------------------------------------------------
    def _map_complete(self) -> bool:
        return all(("server", s) in self.members and self.members[("server", s)].alive
                   for s in range(self.servers))

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

    def run(self, tick_s: float) -> None:
        """Serve until shut down, expiring leases every tick."""
        self.start()
        self.log.emit("coordinator_start", address=self.address)
        while not self._shutdown.wait(tick_s):
            self._check_leases()
        self.log.emit("coordinator_stop", reason=self.stop_reason)
        self.close()
