"""The server process: serve one shard until the coordinator says the job is over.

Without chains, server process ``i`` serves shard ``i``; with chain replication of
``K`` replicas it serves shard ``i // K`` as one link of that shard's chain.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from ..control import CoordinatorClient
from ..metrics import EventLog
from ..recovery import Checkpointer
from ..sync import parse_policy
from ..transport import get_transport
from ..recovery.chain import ChainReplica, join_chain
from ..recovery.stateless import RebuildWindow
from .optim import optimizer_from_config
from .server import ParameterServer, serve_until


def run_server(spec, index: int) -> int:
    from ..launch.spec import HOST_ENV, token_from_env
    job, token = spec.job, token_from_env()
    r = job.recovery
    shard = index // r.replicas_per_shard
    log = EventLog.for_role(spec.run_dir, "server", index)
    size = spec.bounds[shard + 1] - spec.bounds[shard]
    optimizer = optimizer_from_config(job.optimizer, size)
    policy = parse_policy(job.sync.policy)(job.cluster.workers, size, leader=shard == 0)
    checkpointer = None
    if r.strategy == "checkpoint" or (r.strategy == "stateless" and r.snapshot):
        checkpointer = Checkpointer(r.dir or Path(spec.run_dir) / "checkpoints", shard, log,
                                    every_updates=r.every_updates, every_s=r.every_s, keep=r.keep)
    # A launcher that places roles on hosts of their own (netlab) says where this one is.
    host = os.environ.get(HOST_ENV) or job.cluster.host
    listener = get_transport(job.cluster.transport, job.ltp, shm=job.cluster.shm).listen(host, 0)
    server = ParameterServer(listener, token, log, shard=shard, size=size, optimizer=optimizer,
                             policy=policy, workers=job.cluster.workers, checkpointer=checkpointer)
    if r.strategy == "stateless":
        server.attach_stateless(RebuildWindow(job.cluster.workers, r.rebuild_window_s), r.flush_rule, r.flush_clip)
    if checkpointer is not None and (loaded := checkpointer.load_newest()) is not None:
        if server.rebuild is not None and "params" in loaded[1]:  # stateless: a candidate among the workers' copies
            server.rebuild.offer("snapshot", loaded[0], 0, loaded[1]["params"], time.monotonic())
        else:
            server.restore(*loaded)
    done = threading.Event()
    control = CoordinatorClient(spec.coordinator, token, "server", index)
    chain = None
    if r.strategy == "chain":
        chain = ChainReplica(server, index, control, token, job.cluster.transport, r.mode, r.every_updates or 0)
        server.attach_chain(chain)

    def on_state(state: str) -> None:
        if state in ("stopping", "shutdown"):
            server.stop_waiting()
        if state == "shutdown":
            done.set()

    server.start()
    control.register(address=server.address)
    control.start_heartbeats(job.cluster.heartbeat_s, stats=server.snapshot_stats, on_state=on_state)
    threading.Thread(target=lambda: control.lost.wait() and done.set(), daemon=True).start()
    if chain is not None:
        join_chain(server, chain)  # returns at once for a member of the first chain
        chain.start()
    serve_until(server, done)
    if control.lost.is_set() and control.state != "shutdown":
        log.emit("coordinator_lost")
    if chain is not None:
        chain.close()
    if checkpointer is not None:
        checkpointer.close()
    control.close()
    log.close()
    return 0
