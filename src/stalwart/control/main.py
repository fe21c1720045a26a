"""The coordinator process: a leader, or a standby until the store says it leads."""

from __future__ import annotations

import os

from ..metrics import EventLog
from ..recovery.chain import ChainMode
from ..transport import TcpTransport
from .coordinator import Coordinator
from .store import ControlStore, EtcdStore, MemoryStore


def store_from_config(store: str, job_id: str, index: int = 0) -> ControlStore:
    return MemoryStore() if store == "memory" else EtcdStore(store, job_id, first_wait_s=float(index))


def run_coordinator(spec, index: int = 0) -> int:
    from ..spec import LISTEN_FD_ENV, token_from_env
    job = spec.job
    log = EventLog.for_role(spec.run_dir, "coordinator", index)
    # The launcher bound the socket and handed it down, so its address was known
    # before this process existed.
    listener = TcpTransport().listen_fd(int(os.environ[LISTEN_FD_ENV]))
    coordinator = Coordinator(listener, token_from_env(), log, servers=job.cluster.servers,
                              workers=job.cluster.worker_slots, lease_s=job.cluster.lease_s,
                              replicas=job.recovery.replicas_per_shard,
                              pulls_at_tail=job.recovery.mode == ChainMode.STRONG,
                              store=store_from_config(job.control.store, spec.job_id, index),
                              bounds=spec.bounds or None, joins=not job.sync.policy.startswith("elastic"))
    code = coordinator.run(tick_s=job.cluster.heartbeat_s)
    log.close()
    return code
