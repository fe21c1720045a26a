"""Where the coordinator's state outlives the coordinator, and who leads.

The coordinator keeps membership, the shard map, the chains and the epoch in memory and
serves every request from there; a :class:`ControlStore` is what it leans on to survive
its own death. The interface is three calls:

* :meth:`ControlStore.lead` blocks until this process may act as the coordinator and
  returns its **generation**, a number above every earlier leader's. Epochs are
  ``generation * EPOCH_STRIDE + n``, so whatever a role has seen from an earlier
  coordinator is below anything the new one hands out, before anyone has rejoined.
* :meth:`ControlStore.load` returns the state the last leader saved, or None.
* :meth:`ControlStore.save` records the state after a change, and raises
  :class:`Deposed` if another process has taken the lead meanwhile (fencing: a
  coordinator that lost its lease cannot overwrite its successor's state).

Two implementations, chosen by ``control.store``:

* :class:`MemoryStore` (the default) keeps nothing: the generation is the launcher's
  count of coordinator starts, and a restarted coordinator rebuilds its state from the
  roles' rejoins (soft state). One coordinator process at a time.
* :class:`EtcdStore` keeps a snapshot in etcd, under ``/stalwart/<job>/``, and elects
  the leader there: ``leader`` is a key bound to a 2 s etcd lease that the leader keeps
  alive; the generation is that key's mod revision (etcd revisions only grow); ``state``
  is written only by a transaction that checks ``leader`` is still ours, and once the
  job has shut down it is written under a 60 s lease, so etcd forgets finished jobs. Standbys poll
  the key and also probe the leader's address: a leader SIGKILLed stops answering at
  once, and a standby replaces it by compare-and-swap on the exact key it saw, without
  waiting for the lease (at least 1 s in etcd) to run out. That is what makes a takeover
  fit in well under a second. A leader that is only partitioned away from one standby
  loses the lead the same way; its next save fails, and it steps down.

Client choice: ``etcd3gw`` (OpenStack, maintained, typed): synchronous like our
threads, and it speaks etcd's JSON gateway over HTTP, so it brings no gRPC or protobuf
build. ``etcd3`` (python-etcd3) has had no release since 2020 and breaks on current
protobuf; ``aetcd`` is asyncio-only.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from abc import ABC, abstractmethod
from typing import Callable

from ..transport.base import answers

EPOCH_STRIDE = 1 << 20          # epochs a generation may use before the next one's begin
INCARNATION_ENV = "STALWART_INCARNATION"  # the launcher's count of this role's starts
LEADER_TTL_S = 2                 # etcd lease on the leader key (etcd counts whole seconds)
POLL_S = 0.05                    # a standby's look at the leader key and the leader itself
FINAL_STATE_TTL_S = 60           # how long a finished job's state stays in etcd


class Deposed(RuntimeError):
    """Another coordinator has taken the lead: this one must stop acting."""


class StoreError(RuntimeError):
    """The store cannot be reached or holds something unreadable; the message says which."""


class ControlStore(ABC):
    @abstractmethod
    def lead(self, address: str, stopped: Callable[[], bool]) -> int:
        """Block until this process leads (or ``stopped()``); returns its generation."""

    @abstractmethod
    def load(self) -> dict | None:
        """The state the last leader saved, or None."""

    @abstractmethod
    def save(self, state: dict) -> None:
        """Record the state after a change; raises :class:`Deposed` if no longer leader."""

    def lost(self) -> bool:
        """Has the lead gone since :meth:`lead` returned (a lease that lapsed)?"""
        return False

    def close(self) -> None:
        """Give up the lead (if held) and any connection."""


class MemoryStore(ControlStore):
    """Nothing outlives the process; the roles' rejoins rebuild the state."""

    def __init__(self, generation: int | None = None):
        self.generation = generation if generation is not None else int(os.environ.get(INCARNATION_ENV, "1"))

    def lead(self, address: str, stopped: Callable[[], bool]) -> int:
        return self.generation

    def load(self) -> dict | None:
        return None

    def save(self, state: dict) -> None:
        pass


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class EtcdStore(ControlStore):
    def __init__(self, endpoint: str, job: str, *, timeout_s: float = 2.0, first_wait_s: float = 0.0):
        try:
            import etcd3gw
        except ImportError:
            raise StoreError("the etcd store needs the etcd3gw package (pip install etcd3gw)") from None
        host, _, port = endpoint.removeprefix("etcd://").rpartition(":")
        if not host or not port.isdigit():
            raise StoreError(f"etcd endpoint {endpoint!r}: expected etcd://HOST:PORT")
        self.endpoint = f"{host}:{port}"
        self._etcd = etcd3gw.client(host=host, port=int(port), timeout=timeout_s, api_path="/v3/")
        self._exc = etcd3gw.exceptions.Etcd3Exception
        self.prefix = f"/stalwart/{job}/"
        # Standby k waits k seconds before contending for a lead nobody holds yet, so
        # that coordinator 0 leads first; a dead leader is replaced at once by anyone.
        self.first_wait_s = first_wait_s
        self._lock = threading.Lock()        # one HTTP session, many threads
        self._lease_id: int | None = None
        self._leader_revision: int | None = None
        self._keeper: threading.Thread | None = None
        self._closed = threading.Event()
        self.deposed = threading.Event()

    # --- plumbing -------------------------------------------------------------------
    def _post(self, path: str, body: dict) -> dict:
        with self._lock:
            try:
                return self._etcd.post(self._etcd.get_url(path), json=body)
            except self._exc as exc:
                detail = str(exc).strip() or "no answer"
                raise StoreError(f"etcd at {self.endpoint}: {type(exc).__name__}: {detail}") from None

    def _get(self, key: str) -> dict | None:
        kvs = self._post("/kv/range", {"key": _b64(self.prefix + key)}).get("kvs") or []
        return kvs[0] if kvs else None

    def check(self) -> None:
        """Raise :class:`StoreError` naming the endpoint unless an etcd answers there."""
        self._post("/maintenance/status", {})

    # --- leadership -------------------------------------------------------------------
    def lead(self, address: str, stopped: Callable[[], bool]) -> int:
        key = _b64(self.prefix + "leader")
        mine = _b64(json.dumps({"address": address, "pid": os.getpid()}))
        misses, since = 0, time.monotonic()
        while not stopped():
            held = self._get("leader")
            if held is None and time.monotonic() - since < self.first_wait_s:
                compare = None
            elif held is None:
                compare = [{"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": 0}]
            else:
                holder = json.loads(base64.b64decode(held["value"]))
                misses = misses + 1 if not answers(holder["address"]) else 0
                # Two probes in a row that find nothing listening: the leader is dead.
                compare = ([{"key": key, "target": "MOD", "result": "EQUAL",
                             "mod_revision": int(held["mod_revision"])}] if misses >= 2 else None)
            if compare is not None:
                lease_id = int(self._post("/lease/grant", {"TTL": LEADER_TTL_S, "ID": 0})["ID"])
                reply = self._post("/kv/txn", {"compare": compare, "success": [
                    {"request_put": {"key": key, "value": mine, "lease": lease_id}}]})
                if reply.get("succeeded"):
                    self._lease_id = lease_id
                    self._leader_revision = int(reply["header"]["revision"])
                    self._keeper = threading.Thread(target=self._keep_alive, daemon=True, name="etcd-lease")
                    self._keeper.start()
                    return self._leader_revision
                self._post("/lease/revoke", {"ID": lease_id})  # someone else won the race
            time.sleep(POLL_S)
        raise Deposed("stopped before leading")

    def _keep_alive(self) -> None:
        while not self._closed.wait(LEADER_TTL_S / 4):
            try:
                ttl = self._post("/lease/keepalive", {"ID": self._lease_id}).get("result", {}).get("TTL")
            except StoreError:
                ttl = None
            if ttl is None or int(ttl) <= 0:
                self.deposed.set()
                return

    def _fence(self) -> dict:
        return {"key": _b64(self.prefix + "leader"), "target": "MOD", "result": "EQUAL",
                "mod_revision": self._leader_revision}

    # --- state --------------------------------------------------------------------------
    def load(self) -> dict | None:
        held = self._get("state")
        if held is None:
            return None
        try:
            return json.loads(base64.b64decode(held["value"]))
        except ValueError as exc:
            raise StoreError(f"etcd at {self.endpoint}: {self.prefix}state is not a coordinator state: {exc}") from None

    def save(self, state: dict) -> None:
        if self._leader_revision is None or self.deposed.is_set():
            raise Deposed("this coordinator does not lead")
        put = {"key": _b64(self.prefix + "state"), "value": _b64(json.dumps(state))}
        if state.get("state") == "shutdown":
            # The job's last word: kept long enough for every standby to read it and go,
            # then etcd deletes it, so that a shared etcd does not collect dead jobs.
            put["lease"] = int(self._post("/lease/grant", {"TTL": FINAL_STATE_TTL_S, "ID": 0})["ID"])
        reply = self._post("/kv/txn", {"compare": [self._fence()], "success": [{"request_put": put}]})
        if not reply.get("succeeded"):
            self.deposed.set()
            raise Deposed("another coordinator took the lead")

    def lost(self) -> bool:
        return self.deposed.is_set()

    def close(self) -> None:
        self._closed.set()
        if self._lease_id is not None and not self.deposed.is_set():
            try:
                self._post("/lease/revoke", {"ID": self._lease_id})  # the lead goes at once
            except StoreError:
                pass
        self._lease_id = None
