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

**Surviving its own death.** Training never waits on the coordinator: workers and
servers push and pull with the map they hold, and their handles retry heartbeats and
reports through an outage (see :mod:`stalwart.control.client`). A restarted coordinator
(or, with etcd, a standby that takes over) leads under a new *generation* from its
:class:`~stalwart.control.store.ControlStore`, and its epochs start at
``generation * EPOCH_STRIDE``: above every epoch any role has seen. With the etcd store
it loads the state its predecessor saved; in memory it starts empty and rebuilds from
the members' ``rejoin``s: each brings its role, index, address, the highest epoch it
saw, the job state, and (a replica) its chain as last read. For each shard the view
with the highest epoch wins, until this coordinator changes that chain itself; a
member named in an adopted chain but not yet rejoined is given a fresh lease, so a
server that died during the outage is removed a lease later (or at once, when someone
suspects it), the usual way.

**The parameter layout.** The servers must know how long each shard is before they
can hold it. A built-in job fixes it before any process starts (the coordinator is
given the shard bounds); a user's script brings its own model, so the first worker
that reaches ``layout`` with its parameter count fixes it for the job: the bounds are
cut from that count (:meth:`~stalwart.layout.ParameterLayout.shard_bounds`), servers
waiting in ``layout`` learn their shard's length, and a later worker whose model has
another count is refused with both counts named. The layout is part of the saved
state, and every member that knows it brings it in its ``rejoin``, so a coordinator
restarted in memory knows it again with the first rejoin.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..layout import ParameterLayout
from ..metrics import EventLog
from ..transport import Frame, Kind, ProtocolError
from ..transport.base import Listener, answers
from ..transport.service import FrameService, Session
from .store import EPOCH_STRIDE, ControlStore, Deposed, MemoryStore, StoreError

JOB_STATES = ("running", "stopping", "shutdown")
ROLES = ("server", "worker", "driver", "client", "bench", "observer")
JOIN_GRACE_S = 30.0  # how long a worker slot is held for a joiner that has not registered yet


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
    chain's tail (strong chains) rather than its head. ``store`` is where the state
    outlives this process and who leads (:class:`MemoryStore` by default); until it
    leads, the coordinator answers every request as a standby.
    """

    def __init__(self, listener: Listener, token: bytes, log: EventLog, *, servers: int,
                 workers: int, lease_s: float, replicas: int = 1, pulls_at_tail: bool = True,
                 store: ControlStore | None = None, bounds: list[int] | None = None, joins: bool = True):
        super().__init__(listener, token, log)
        # ``servers`` counts shards; there are ``servers * replicas`` server processes.
        self.servers, self.workers, self.lease_s, self.replicas = servers, workers, lease_s, replicas
        self.store = store or MemoryStore()
        self.chains: dict[int, list[int]] = {}   # shard -> server process indices, head first
        # Strong chains serve pulls at the tail; relaxed ones (whose tail lags by design) at the head.
        self.pulls_at_tail = pulls_at_tail
        self.formed: set[int] = set()             # shards whose first chain is complete
        self.members: dict[tuple[str, int], Member] = {}
        self.state = "running"
        self.stop_reason: str | None = None
        self.generation: int | None = None        # None: a standby, not leading yet
        self.epoch = 0
        self._adopted: dict[int, int] = {}        # shard -> epoch of the rejoin view adopted
        self._edited: set[int] = set()            # shards whose chain this coordinator changed
        self._told: set[tuple[str, int]] = set()  # members that heard "shutdown"
        self._cond = threading.Condition()
        self._shutdown = threading.Event()
        self.deposed = False
        self._closed_job = False  # took over a job that had already shut down
        self.joins = joins        # whether workers may join the running job (ElasticBSP: no)
        # {"total", "bounds", "source"}: fixed before the start (built-in models) or by the
        # first worker that proposes one (a user's script); None until then.
        self.layout: dict | None = {"total": bounds[-1], "bounds": list(bounds), "source": "job"} if bounds else None

    # --- wire --------------------------------------------------------------------
    def handle(self, session: Session, frame: Frame) -> None:
        if frame.kind != Kind.REQUEST or not frame.meta or not isinstance(frame.meta.get("op"), str):
            raise ProtocolError(f"coordinator expects REQUEST frames with an 'op', got {frame.kind.name}")
        args = dict(frame.meta)
        op = args.pop("op")
        method = getattr(self, f"op_{op}", None)
        if self.generation is None:
            reply = {"standby": True, "error": "a standby coordinator: another one leads"}
        elif method is None:
            reply = {"error": f"unknown op {op!r}"}
        else:
            try:
                reply = method(**args)
            except (TypeError, ValueError) as exc:
                reply = {"error": f"bad arguments for {op!r}: {exc}"}
            except Deposed as exc:
                reply = {"standby": True, "error": f"this coordinator was deposed: {exc}"}
                self.deposed = True
                self._shutdown.set()
            except StoreError as exc:  # applied here, saved with the next change that saves
                reply = {"error": f"the control store failed: {exc}"}
        session.conn.send(Frame(Kind.REPLY, meta=reply))
        if self.state == "shutdown":
            # Only once the reply is out: the serving loop closes every connection then,
            # and the one who asked must not see its connection cut instead of the answer.
            self._shutdown.set()

    def _refusal(self, role: object, index: object) -> str | None:
        """Why a member named (role, index) cannot be in this job, if it cannot."""
        if role not in ROLES:
            return f"unknown role {role!r} (one of {', '.join(ROLES)})"
        limit = {"server": self.servers * self.replicas, "worker": self.workers}.get(role)
        if not isinstance(index, int) or isinstance(index, bool):
            return f"{role} index {index!r} is not an integer"
        if limit is not None and not 0 <= index < limit:
            return f"{role} index {index} is outside this job (0..{limit - 1})"
        return None

    # --- ops ---------------------------------------------------------------------
    def op_register(self, role: str, index: int, address: str | None = None,
                    pid: int | None = None) -> dict:
        """A member process that has just started (a restarted one is a new member)."""
        if (why := self._refusal(role, index)) is not None:
            return {"error": why}
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
                self._edited.add(shard)
            self._changed()  # every member is in the saved state, not only servers
            self._cond.notify_all()
        self.log.emit("member_joined", member_role=role, member_index=index, address=address, pid=pid)
        return {"state": self.state, "epoch": self.epoch, "lease_s": self.lease_s}

    def op_rejoin(self, role: str, index: int, address: str | None = None, pid: int | None = None,
                  seen_epoch: int = 0, job_state: str = "running", chain: list | None = None,
                  formed: bool = False, layout: dict | None = None) -> dict:
        """A live member that lost its connection (this coordinator may be new): take
        what it knows as soft state (see the module's docstring)."""
        if (why := self._refusal(role, index)) is not None:
            return {"error": why}
        if job_state not in JOB_STATES:
            return {"error": f"unknown job state {job_state!r}"}
        seen_epoch = int(seen_epoch)
        with self._cond:
            if seen_epoch > self.epoch:
                return {"error": f"{role} {index} has seen epoch {seen_epoch}, ahead of this coordinator's "
                                 f"{self.epoch}: a newer coordinator leads, and this one is stale"}
            now = time.monotonic()
            known = self.members.get((role, index))
            if known is None or known.pid != pid:
                self.members[(role, index)] = Member(role, index, address, pid, now)
            else:
                known.last_seen, known.alive = now, True
            changed = False
            if JOB_STATES.index(job_state) > JOB_STATES.index(self.state) and job_state != "shutdown":
                self.state, changed = job_state, True
            if role == "server":
                changed |= self._adopt_chain(index, seen_epoch, chain, bool(formed), now)
            if layout is not None and self.layout is None:
                self.layout, changed = self._checked_layout(layout), True
            if changed:
                self._changed()
            self._cond.notify_all()
        self.log.emit("member_rejoined", member_role=role, member_index=index, address=address,
                      seen_epoch=seen_epoch, epoch=self.epoch)
        return {"state": self.state, "epoch": self.epoch, "lease_s": self.lease_s}

    def _adopt_chain(self, index: int, seen_epoch: int, chain: list | None, formed: bool, now: float) -> bool:
        """Caller holds _cond. Take a rejoining server's chain view if it is the best one
        yet from an earlier generation and this coordinator has not changed the chain."""
        shard = index // self.replicas
        if self.replicas == 1:
            if self.chains.get(shard) == [index]:
                return False
            self.chains[shard] = [index]
            self.formed.add(shard)
            return True
        if chain is None or shard in self._edited or seen_epoch >= self.generation * EPOCH_STRIDE \
                or seen_epoch <= self._adopted.get(shard, -1):
            return False
        links = [(int(i), str(a)) for i, a in chain]
        if any(i // self.replicas != shard for i, _ in links):
            raise ValueError(f"server {index}'s chain {links} names servers of another shard")
        self.chains[shard] = [i for i, _ in links]
        for i, a in links:
            if ("server", i) not in self.members:  # not rejoined yet: a lease's grace to do it
                self.members[("server", i)] = Member("server", i, a, None, now)
        if formed:
            self.formed.add(shard)
        self._adopted[shard] = seen_epoch
        return True

    def op_join_worker(self, pid: int | None = None) -> dict:
        """A worker that wants to join the running job: the lowest free worker index (never
        used, or its worker gone), held for it with a fresh lease until it registers."""
        if not self.joins:
            return {"error": "workers cannot join under ElasticBSP: its leader plans each barrier for the "
                             "workers it has timed, and a newcomer is in no plan; use bsp, ssp, dssp or asp"}
        with self._cond:
            if self.state != "running":
                return {"error": f"the job is {self.state}: there is nothing left to join"}
            taken = {i for (role, i), m in self.members.items() if role == "worker" and m.alive}
            free = next((w for w in range(self.workers) if w not in taken), None)
            if free is None:
                return {"error": f"every one of the job's {self.workers} worker slots is taken; start the job "
                                 f"with a larger cluster.max_workers to let more workers join"}
            # Held past the lease: the joiner's process is still starting (importing torch).
            self.members[("worker", free)] = Member("worker", free, None, pid, time.monotonic() + JOIN_GRACE_S)
        self.log.emit("worker_slot", member_index=free, pid=pid)
        return {"index": free, "state": self.state, "epoch": self.epoch}

    def _checked_layout(self, layout: dict) -> dict:
        """A layout a member brought back, as this job would have cut it."""
        total, bounds = int(layout["total"]), [int(b) for b in layout["bounds"]]
        if len(bounds) != self.servers + 1 or bounds[0] != 0 or bounds[-1] != total or bounds != sorted(bounds):
            raise ValueError(f"layout bounds {bounds} do not cut {total} parameters into {self.servers} shards")
        return {"total": total, "bounds": bounds, "source": str(layout.get("source", "rejoin")),
                "digest": layout.get("digest")}

    def op_layout(self, total: int | None = None, worker: int | None = None, wait_s: float = 0.0,
                  digest: str | None = None) -> dict:
        """The job's parameter layout. A worker proposes its model's parameter count
        (``total``): the first proposal fixes the layout, a different count later is
        refused. Without ``total`` (a server) it waits up to ``wait_s`` for one."""
        if total is not None:
            if type(total) is not int or total < 1:
                return {"error": f"a layout needs a positive parameter count, got {total!r}"}
            with self._cond:
                if self.layout is None:
                    try:
                        bounds = ParameterLayout([("model", (total,))]).shard_bounds(self.servers)
                    except ValueError as exc:
                        return {"error": str(exc)}
                    self.layout = {"total": total, "bounds": bounds, "source": f"worker {worker}", "digest": digest}
                    self._changed()
                    self._cond.notify_all()
                    self.log.emit("layout", total=total, bounds=bounds, source=self.layout["source"])
                elif self.layout["total"] != total:
                    return {"error": f"this worker's model has {total} parameters; the job's servers hold "
                                     f"{self.layout['total']} (the model of {self.layout['source']}): every "
                                     f"worker must train the same model"}
                elif None not in (digest, self.layout.get("digest")) and digest != self.layout["digest"]:
                    return {"error": f"this worker's model has the job's {total} parameters, but under other names "
                                     f"or shapes than the model of {self.layout['source']}: every worker must train "
                                     f"the same model"}
                return {"ready": True, "state": self.state, "epoch": self.epoch, **self.layout}
        deadline = time.monotonic() + min(float(wait_s), 60.0)
        with self._cond:
            while self.layout is None and self.state == "running" and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            if self.layout is None:
                return {"ready": False, "state": self.state, "epoch": self.epoch}
            return {"ready": True, "state": self.state, "epoch": self.epoch, **self.layout}

    def op_heartbeat(self, role: str, index: int, stats: dict | None = None) -> dict:
        with self._cond:
            member = self.members.get((role, index))
            if member is None:
                return {"error": f"{role} {index} is not registered"}
            member.last_seen = time.monotonic()
            member.alive = True
            if stats:
                member.stats = stats
            if self.state == "shutdown":
                self._told.add((role, index))
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
        if address is not None and answers(address):
            return {"removed": False, "epoch": self.epoch}
        removed = self._remove_replica(index, f"reported by {reporter}")
        return {"removed": removed, "epoch": self.epoch}

    def op_chain_join(self, index: int, epoch: int | None = None) -> dict:
        """Server ``index`` holds its tail's state and is forwarded every update: append it.

        ``epoch`` is the one the joiner read its chain at: from an earlier coordinator's
        generation, the tail it copied may no longer be the tail, so it is refused."""
        if (why := self._refusal("server", index)) is not None:
            return {"error": why}
        if epoch is not None and int(epoch) < self.generation * EPOCH_STRIDE:
            return {"error": f"stale epoch {epoch}: the chain was read from an earlier coordinator "
                             f"(this one's epochs start at {self.generation * EPOCH_STRIDE}); read it again"}
        shard = index // self.replicas
        with self._cond:
            chain = self.chains.setdefault(shard, [])
            if index not in chain:
                chain.append(index)
                self._edited.add(shard)
                self._changed()
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
            self._edited.add(shard)
            self._changed()
            self._cond.notify_all()
            members = list(chain)
        self.log.emit("replica_removed", shard=shard, member_index=index, chain=members, epoch=self.epoch,
                      why=why)
        return True

    def op_status(self) -> dict:
        with self._cond:
            members = [{"role": m.role, "index": m.index, "alive": m.alive, "stats": m.stats,
                        "address": m.address} for m in self.members.values()]
            return {"state": self.state, "epoch": self.epoch, "generation": self.generation, "members": members,
                    "chains": [list(self.chains.get(s, [])) for s in range(self.servers)],
                    "stop_reason": self.stop_reason}

    def op_stop(self, reason: str = "requested") -> dict:
        return self._set_state("stopping", reason)

    def op_shutdown(self, reason: str = "requested") -> dict:
        return self._set_state("shutdown", reason)  # the loop stops once this is answered

    # --- state that outlives the process ---------------------------------------------
    def snapshot(self) -> dict:
        """What the store keeps: everything but leases' clocks and heartbeat stats."""
        with self._cond:
            return {"epoch": self.epoch, "state": self.state, "stop_reason": self.stop_reason,
                    "members": [[m.role, m.index, m.address, m.pid, m.alive] for m in self.members.values()],
                    "chains": {str(s): list(c) for s, c in self.chains.items()}, "formed": sorted(self.formed),
                    "layout": self.layout}

    def restore(self, saved: dict) -> None:
        """Take a predecessor's snapshot; every member gets a fresh lease to prove it lives."""
        now = time.monotonic()
        with self._cond:
            self.members = {(r, i): Member(r, i, a, p, now, alive) for r, i, a, p, alive in saved["members"]}
            self.chains = {int(s): list(c) for s, c in saved["chains"].items()}
            self.formed = set(saved["formed"])
            self.layout = saved.get("layout") or self.layout
            self.state, self.stop_reason = saved["state"], saved["stop_reason"]
            self._edited = set(self.chains)  # the saved chains are current: no rejoin overrides them

    def _changed(self) -> None:
        """Caller holds _cond. A new epoch, saved (raises Deposed if another leads)."""
        self.epoch += 1
        self.store.save(self.snapshot())

    # --- internals ---------------------------------------------------------------
    def _map_complete(self) -> bool:
        return all(s in self.formed and self.chains.get(s) and
                   all(self.members[("server", i)].alive for i in self.chains[s]) for s in range(self.servers))

    def _set_state(self, state: str, reason: str) -> dict:
        with self._cond:
            if JOB_STATES.index(state) > JOB_STATES.index(self.state):
                self.state = state
                self.stop_reason = self.stop_reason or reason
                self._changed()
                self._cond.notify_all()
                self.log.emit("job_state", state=state, reason=reason)
            return {"state": self.state, "epoch": self.epoch}

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

    def _everyone_told(self) -> bool:
        with self._cond:
            return all(key in self._told for key, m in self.members.items()
                       if m.alive and m.role in ("server", "worker"))

    def lead(self) -> None:
        """Block until the store says this process leads; then take up the saved state."""
        generation = self.store.lead(self.address, self._shutdown.is_set)
        saved = self.store.load()
        if saved is not None:
            self.restore(saved)
        with self._cond:
            self.epoch = max(int(saved["epoch"]) if saved else 0, generation * EPOCH_STRIDE)
            self.generation = generation  # from here on requests are served, not deflected
        self.log.emit("coordinator_leads", generation=generation, epoch=self.epoch, restored=saved is not None,
                      members=len(self.members))
        if self.state == "shutdown":  # a standby that outlived the job: nothing left to lead
            self._closed_job = True
            self._shutdown.set()

    def run(self, tick_s: float) -> int:
        """Serve until shut down, expiring leases every tick; 0, or 3 if deposed."""
        self.start()
        self.log.emit("coordinator_start", address=self.address, store=type(self.store).__name__)
        try:
            self.lead()
        except Deposed:
            self.close()
            return 0  # shut down before it ever led
        while not self._shutdown.wait(tick_s):
            if self.store.lost():
                self.deposed = True
                break
            self._check_leases()
        if self.deposed:
            self.log.emit("coordinator_deposed", generation=self.generation)
            self.generation = None  # answer as a standby from now on, then go
            self.close()
            return 3
        # A live member heartbeats within its lease; one silent longer is dead to us anyway.
        deadline = time.monotonic() + self.lease_s + 2 * tick_s
        while not (self._closed.is_set() or self._closed_job or self._everyone_told()) and time.monotonic() < deadline:
            time.sleep(tick_s / 4)  # every member hears "shutdown" on its next heartbeat
        self.log.emit("coordinator_stop", reason=self.stop_reason)
        self.store.close()
        self.close()
        return 0
