"""The server process: serve one shard until the coordinator says the job is over.

The shard's length comes from the job's bounds, or, for a user's script whose model no
one knows before it runs, from the layout its first worker brings (the coordinator's
``layout``), waited for before the server registers.

Without chains, server process ``i`` serves shard ``i``; with chain replication of
``K`` replicas it serves shard ``i // K`` as one link of that shard's chain.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from ..config import JobConfig
from ..control import CoordinatorClient, CoordinatorError
from ..metrics import EventLog
from ..optim import optimizer_from_config
from ..recovery import CheckpointRecovery, Checkpointer, RecoveryStrategy
from ..recovery.chain import ChainRecovery
from ..recovery.stateless import RebuildWindow, StatelessRecovery
from ..shard import ShardState
from ..spec import HOST_ENV, RoleSpec, token_from_env
from ..sync import parse_policy
from ..transport import get_transport
from .server import ParameterServer, serve_until


def recovery_from_config(job: JobConfig, run_dir: str, index: int, shard: int, log: EventLog,
                         control: CoordinatorClient, token: bytes) -> RecoveryStrategy:
    """The strategy the job's ``recovery`` section names, for server process ``index``."""
    r = job.recovery
    checkpointer = None
    if r.strategy == "checkpoint" or (r.strategy == "stateless" and r.snapshot):
        checkpointer = Checkpointer(r.dir or Path(run_dir) / "checkpoints", shard, log,
                                    every_updates=r.every_updates, every_s=r.every_s, keep=r.keep)
    if r.strategy == "checkpoint":
        return CheckpointRecovery(checkpointer)
    if r.strategy == "stateless":
        return StatelessRecovery(RebuildWindow(job.cluster.workers, r.rebuild_window_s), r.flush_rule,
                                 r.flush_clip, checkpointer, outer_lr=r.outer_lr, outer_momentum=r.outer_momentum,
                                 max_ratio=r.flush_max_ratio)
    if r.strategy == "chain":
        return ChainRecovery(index, control, token, job.cluster.transport, r.mode, r.every_updates or 0)
    return RecoveryStrategy()


def _bounds(spec: RoleSpec, control: CoordinatorClient, log: EventLog) -> list[int] | None:
    """The shard bounds: the job's (a built-in model), or the layout the first worker
    of a script brings, waited for; None if the job ends before any worker came."""
    if spec.bounds:
        return spec.bounds
    while True:
        try:
            return control.layout(timeout_s=spec.job.control.patience_s)
        except CoordinatorError:
            if control.state != "running":
                log.emit("server_stop", reason=f"job {control.state} before any worker brought its model")
                return None


def run_server(spec: RoleSpec, index: int) -> int:
    job, token = spec.job, token_from_env()
    shard = index // job.recovery.replicas_per_shard
    log = EventLog.for_role(spec.run_dir, "server", index)
    control = CoordinatorClient(spec.coordinator, token, "server", index, give_up_s=job.control.patience_s)
    bounds = _bounds(spec, control, log)
    if bounds is None:
        control.close()
        log.close()
        return 0
    size = bounds[shard + 1] - bounds[shard]
    state = ShardState(shard, size, optimizer_from_config(job.optimizer, size),
                       parse_policy(job.sync.policy)(job.cluster.workers, size, leader=shard == 0),
                       job.cluster.worker_slots, log)
    recovery = recovery_from_config(job, spec.run_dir, index, shard, log, control, token)
    # A launcher that places roles on hosts of their own (netlab) says where this one is.
    host = os.environ.get(HOST_ENV) or job.cluster.host
    listener = get_transport(job.cluster.transport, job.ltp, shm=job.cluster.shm).listen(host, 0)
    server = ParameterServer(listener, token, log, state, recovery)
    recovery.recover()
    done = threading.Event()

    def on_state(job_state: str) -> None:
        if job_state in ("stopping", "shutdown"):
            state.stop_waiting()
        if job_state == "shutdown":
            done.set()

    server.start()
    # A server restarted while the coordinator is down waits for one to come back.
    control.register(address=server.address, patience_s=job.control.patience_s)
    control.start_heartbeats(job.cluster.heartbeat_s, stats=server.snapshot_stats, on_state=on_state)
    threading.Thread(target=lambda: control.lost.wait() and done.set(), daemon=True).start()
    recovery.start()
    serve_until(server, done)
    if control.lost.is_set() and control.state != "shutdown":
        log.emit("coordinator_lost", silent_s=job.control.patience_s)
    recovery.close()
    control.close()
    log.close()
    return 0
