"""A role's handle on the coordinator: requests that survive its restarts, and heartbeats.

The control plane may be down while the data plane is not, and training must not
notice: a coordinator is killed and restarted, or (with etcd) a standby takes over at
another address. So this handle

* **dials lazily and again**: every request that finds no live connection dials the
  coordinator addresses in turn (``host:port[,host:port...]``), skipping a standby that
  answers that it does not lead, and retries, with backoff, for as long as the caller's
  ``patience_s`` allows. Every op is idempotent, so a request cut off by a kill is simply
  sent again. A caller that must not block (the driver, which restarts the coordinator)
  asks with no patience and gets :class:`CoordinatorUnavailable` at once.
* **rejoins**: the first connection after a lost one re-registers this member with what
  it knows (:meth:`rejoin_view`): its address and pid, the highest epoch it has seen,
  the job state, and whatever its role adds (a replica: its chain as last read). A new
  coordinator rebuilds its soft state from these, as torchft's Lighthouse does from its
  replicas' heartbeats.
* **beats on**: the heartbeat thread keeps trying through an outage and gives up (sets
  :attr:`lost`) only after ``give_up_s`` without an answer.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

from ..transport import AuthError, ConnectionClosed, Frame, Kind, ProtocolError, dial

DIAL_TIMEOUT_S = 2.0
# A caller with no patience (the driver) dials this briefly: a restarted coordinator's
# port is bound before its process serves, and a connection there waits unanswered.
HASTY_DIAL_S = 0.25
BACKOFF_S = (0.02, 0.5)  # first and longest wait between attempts to reach a coordinator


class CoordinatorError(RuntimeError):
    """The coordinator refused a request or could not be reached."""


class CoordinatorUnavailable(CoordinatorError):
    """No coordinator answered in time: it is down, restarting, or no standby leads yet."""


class _Standby(Exception):
    """The coordinator dialled does not lead (an etcd standby): try the next address."""


class CoordinatorClient:
    def __init__(self, address: str, token: bytes, role: str, index: int, *, patience_s: float = 10.0,
                 give_up_s: float = 60.0):
        self.addresses = [a.strip() for a in address.split(",") if a.strip()]
        if not self.addresses:
            raise CoordinatorError("no coordinator address given")
        self.address = self.addresses[0]   # the one that answered last
        self.token, self.role, self.index = token, role, index
        self.patience_s, self.give_up_s = patience_s, give_up_s
        self._conn = None
        self._lock = threading.Lock()
        self.state = "running"
        self.epoch = 0
        self.tails: list[str] = []
        #: what a role adds to its rejoin (a chain replica: its chain as last read)
        self.rejoin_extra: Callable[[], dict] | None = None
        self.known_layout: dict | None = None  # the job's parameter layout, once read
        self._registered: dict | None = None   # the register() arguments, for rejoins
        self.reconnects = 0
        self._beat: threading.Thread | None = None
        self._closed = threading.Event()
        self.lost = threading.Event()          # the heartbeats gave up on the control plane
        self.unreachable_since: float | None = None

    # --- requests ------------------------------------------------------------------
    def call(self, op: str, patience_s: float | None = None, dial_s: float | None = None, **args: Any) -> dict:
        """Send ``op`` and return its reply; retry through an outage for ``patience_s``
        (the handle's default when None). Raises :class:`CoordinatorUnavailable` when no
        coordinator answered in that time, :class:`CoordinatorError` when one refused.
        ``dial_s`` bounds one dial (by default short when there is no patience)."""
        patience = self.patience_s if patience_s is None else patience_s
        dial_s = dial_s if dial_s is not None else HASTY_DIAL_S if patience == 0 else DIAL_TIMEOUT_S
        deadline = time.monotonic() + patience
        wait = BACKOFF_S[0]
        while True:
            try:
                with self._lock:
                    if self._closed.is_set():
                        raise CoordinatorUnavailable(f"the handle on the coordinator is closed ({op!r})")
                    reply = self._exchange(op, args, dial_s)
                break
            except (OSError, ConnectionClosed, ProtocolError, _Standby) as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CoordinatorUnavailable(f"no coordinator answered {op!r} at {','.join(self.addresses)}"
                                                 f"{f' within {patience:g}s' if patience else ''}: {exc}") from None
                self._closed.wait(min(wait, left))
                wait = min(2 * wait, BACKOFF_S[1])
        if "error" in reply:
            raise CoordinatorError(f"coordinator refused {op!r}: {reply['error']}")
        self._take(reply)
        return reply

    def _take(self, reply: dict) -> None:
        """What every answer tells: the job's state and the highest epoch seen."""
        self.state = reply.get("state", self.state)
        self.epoch = max(self.epoch, int(reply.get("epoch", self.epoch)))

    def _exchange(self, op: str, args: dict, dial_s: float) -> dict:
        """One request on a live connection (made here if need be). Caller holds _lock."""
        if self._conn is None:
            self._connect(dial_s)
        try:
            return self._request(self._conn, op, args)
        except _Standby:
            self._drop()
            self._skip_standby()
            raise
        except (OSError, ConnectionClosed, ProtocolError):
            self._drop()
            raise

    def _skip_standby(self) -> None:
        """The address that answered does not lead: start with the next one."""
        at = self.addresses.index(self.address)
        self.address = self.addresses[(at + 1) % len(self.addresses)]

    def _request(self, conn, op: str, args: dict) -> dict:
        conn.send(Frame(Kind.REQUEST, meta={"op": op, **args}))
        reply = conn.recv()
        if reply.kind != Kind.REPLY or reply.meta is None:
            raise ProtocolError(f"coordinator answered {op!r} with {reply.kind.name}")
        if reply.meta.get("standby"):
            raise _Standby(f"{self.address} is a standby coordinator")
        return reply.meta

    def _connect(self, dial_s: float) -> None:
        """Dial each address in turn, the last one that answered first; rejoin on the
        connection that works if this member had registered before."""
        order = sorted(self.addresses, key=lambda a: a != self.address)
        errors = []
        for address in order:
            try:
                conn = dial(address, self.token, timeout=dial_s, handshake_timeout_s=dial_s)
            except AuthError as exc:  # not an outage: retrying cannot help
                raise CoordinatorError(f"the coordinator at {address} refused this {self.role}: {exc}") from None
            except (OSError, ProtocolError) as exc:
                errors.append(f"{address}: {exc}")
                continue
            self._conn, self.address = conn, address
            if self._registered is None:
                return
            try:
                reply = self._request(conn, "rejoin", self.rejoin_view())
            except _Standby as exc:
                errors.append(str(exc))
                self._drop()
                continue  # the next address in ``order``
            if "error" in reply:
                self._drop()
                raise CoordinatorError(f"coordinator refused this {self.role}'s rejoin: {reply['error']}")
            self.reconnects += 1
            self._take(reply)
            return
        raise ConnectionError("; ".join(errors) or "no address")

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def rejoin_view(self) -> dict:
        """What this member tells a coordinator that may have forgotten it."""
        return {**(self._registered or {}), "seen_epoch": self.epoch, "job_state": self.state,
                **({"layout": self.known_layout} if self.known_layout is not None else {}),
                **(self.rejoin_extra() if self.rejoin_extra is not None else {})}

    # --- the ops roles use ----------------------------------------------------------
    def register(self, address: str | None = None, patience_s: float | None = None) -> dict:
        args = {"role": self.role, "index": self.index, "address": address, "pid": os.getpid()}
        reply = self.call("register", patience_s=patience_s, **args)
        self._registered = args
        return reply

    def shard_map(self, timeout_s: float = 60.0) -> list[str]:
        """Where to push, per shard (a chain's head); ``self.tails``: where to pull."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = max(0.0, deadline - time.monotonic())
            reply = self.call("shard_map", patience_s=left, wait_s=min(5.0, left))
            if reply["ready"]:
                self.tails = list(reply.get("tails", reply["shards"]))
                return list(reply["shards"])
            if reply["state"] != "running" or time.monotonic() >= deadline:
                raise CoordinatorError(f"no complete shard map within {timeout_s}s "
                                       f"(job state {reply['state']})")

    def layout(self, total: int | None = None, timeout_s: float = 60.0, digest: str | None = None) -> list[int]:
        """The job's shard bounds: proposed from this worker's model (``total``, its
        parameter count; refused if the job holds another model), or waited for (a
        server). Once known, the layout travels in this member's rejoins."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = max(0.0, deadline - time.monotonic())
            reply = self.call("layout", patience_s=left, total=total, wait_s=min(5.0, left), digest=digest,
                              worker=self.index if total is not None else None)
            if reply["ready"]:
                self.known_layout = {k: reply.get(k) for k in ("total", "bounds", "source", "digest")}
                return list(reply["bounds"])
            if reply["state"] != "running" or time.monotonic() >= deadline:
                raise CoordinatorError(f"no parameter layout within {timeout_s:g}s: no worker has brought "
                                       f"its model yet (job state {reply['state']})")

    def relocate(self, failed: list[str], timeout_s: float = 1.0) -> tuple[list[str], list[str]]:
        """Report servers whose connections broke, then read where each shard is now.

        To the data plane a shard that cannot be located yet is a connection that cannot
        be made: every failure here is a ``ConnectionError``, which its callers retry."""
        try:
            for address in failed:
                self.call("suspect", patience_s=timeout_s, address=address, reporter=f"{self.role} {self.index}")
            heads = self.shard_map(timeout_s)
        except CoordinatorError as exc:
            raise ConnectionError(str(exc)) from None
        return heads, self.tails

    def start_heartbeats(self, interval_s: float, stats: Callable[[], dict] | None = None,
                         on_state: Callable[[str], None] | None = None) -> None:
        """Renew this member's lease every interval and report job-state changes; through
        an outage keep trying, and give up only after ``give_up_s`` of silence."""

        def beat() -> None:
            while not self._closed.wait(interval_s):
                try:
                    # One try per beat, but a dial may wait in a restarting coordinator's
                    # backlog: its first rejoins then come the moment it serves.
                    reply = self.call("heartbeat", patience_s=0.0, dial_s=DIAL_TIMEOUT_S, role=self.role,
                                      index=self.index, stats=stats() if stats else None)
                except CoordinatorUnavailable:  # (a subclass: caught before the refusals)
                    now = time.monotonic()
                    self.unreachable_since = self.unreachable_since or now
                    if now - self.unreachable_since > self.give_up_s:
                        self.lost.set()
                        return
                    continue
                except CoordinatorError:
                    # Refused (a coordinator that does not know this member, or one that
                    # is stale): dial again, and rejoin, on the next beat.
                    with self._lock:
                        self._drop()
                        self._skip_standby()
                    continue
                self.unreachable_since = None
                if on_state is not None:
                    on_state(reply["state"])

        self._beat = threading.Thread(target=beat, name="heartbeat", daemon=True)
        self._beat.start()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._drop()
