"""The coordinator process."""

from __future__ import annotations

import os

from ..metrics import EventLog
from ..recovery.chain import ChainMode
from ..transport import TcpTransport
from .coordinator import Coordinator


def run_coordinator(spec) -> int:
    from ..spec import LISTEN_FD_ENV, token_from_env
    job = spec.job
    log = EventLog.for_role(spec.run_dir, "coordinator", 0)
    # The launcher bound the socket and handed it down, so its address was known
    # before this process existed.
    listener = TcpTransport().listen_fd(int(os.environ[LISTEN_FD_ENV]))
    coordinator = Coordinator(listener, token_from_env(), log, servers=job.cluster.servers,
                              workers=job.cluster.workers, lease_s=job.cluster.lease_s,
                              replicas=job.recovery.replicas_per_shard,
                              pulls_at_tail=job.recovery.mode == ChainMode.STRONG)
    coordinator.run(tick_s=job.cluster.heartbeat_s)
    log.close()
    return 0
