"""The worker process: train on its own shard of the data until the job stops."""

from __future__ import annotations

import functools
import math
import threading
import time

import numpy as np
import torch

from ..control import CoordinatorClient
from ..data import load_dataset, shard_indices
from ..faults import Straggler, parse_straggler
from ..metrics import EventLog
from ..models import build_model
from .trainthrough import TrainThrough
from ..optim import optimizer_from_config
from .client import JobStopping, ParameterClient
from .failover import Detach, NoFailover, Reconnect, ServerUnavailable
from .optimizer import ParameterServerOptimizer


def run_worker(spec, index: int) -> int:
    from ..spec import token_from_env
    job, token = spec.job, token_from_env()
    torch.set_num_threads(1)  # N workers share the cores; one thread each avoids thrashing
    log = EventLog.for_role(spec.run_dir, "worker", index)
    d, t = job.data, job.train
    ds = load_dataset(d.dataset, seed=t.seed, samples=d.samples, features=d.features, data_dir=d.data_dir)
    mine = shard_indices(len(ds.y_train), job.cluster.workers, index, t.seed)
    x, y = torch.from_numpy(ds.x_train[mine]), torch.from_numpy(ds.y_train[mine])
    model = build_model(job.model.name, ds.input_shape, ds.num_classes, seed=t.seed, hidden=job.model.hidden)
    batch = min(d.batch_size, len(y))
    per_epoch = len(y) // batch
    limit = math.ceil(t.epochs * per_epoch) if t.epochs is not None else None

    stopping = threading.Event()
    progress = {"clock": 0, "loss": None}
    control = CoordinatorClient(spec.coordinator, token, "worker", index)
    control.register()
    control.start_heartbeats(job.cluster.heartbeat_s, stats=lambda: dict(progress),
                             on_state=lambda state: state != "running" and stopping.set())

    def resolve(failed: list[str]) -> tuple[list[str], list[str]]:
        """Where the shards are now, after reporting the servers we lost."""
        try:
            return control.relocate(failed)
        except ConnectionError:
            if control.state != "running":
                raise JobStopping() from None
            raise

    r = job.recovery
    try:
        policy = {"none": NoFailover, "stateless": Detach}.get(r.strategy, Reconnect)
        client = ParameterClient(control.shard_map(), spec.bounds, token, worker=index, tails=control.tails,
                                 transport=job.cluster.transport,
                                 failover=policy(resolve, r.reconnect_s, on_event=log.emit))
    except JobStopping:  # the job ended while this worker was still finding its servers
        log.emit("worker_stop", reason="job stopping", iterations=0)
        control.close()
        log.close()
        return 0
    train_through = None
    if r.strategy == "stateless":
        # Alone on its copy, a worker steps as the servers would: the job's own rule.
        local_optimizer = functools.partial(optimizer_from_config, job.optimizer)
        train_through = TrainThrough(client, local_optimizer, bound=r.backlog_max, when_full=r.when_full,
                                     reconnect_s=r.reconnect_s, on_event=log.emit)
    opt = ParameterServerOptimizer(model, client=client, train_through=train_through)
    log.emit("worker_start", examples=len(y), batch=batch, iterations_per_epoch=per_epoch, limit=limit)

    straggler = Straggler([parse_straggler(r) for r in job.faults.stragglers], index, t.seed)
    rng = np.random.default_rng([t.seed, index])
    loss_fn = torch.nn.CrossEntropyLoss()
    compute_s = comm_s = 0.0
    window: list[float] = []
    reason, status = "finished", 0
    order = rng.permutation(len(y))
    first_step = None
    try:
        while limit is None or opt.clock < limit:
            if stopping.is_set():
                reason = "job stopping"
                break
            pos = (opt.clock % per_epoch) * batch
            if pos == 0 and opt.clock:
                order = rng.permutation(len(y))
            take = order[pos:pos + batch]
            t0 = time.perf_counter()
            model.train()
            opt.zero_grad()
            loss = loss_fn(model(x[take]), y[take])
            loss.backward()
            t1 = time.perf_counter()
            first_step = first_step or t0
            pause, change = straggler.delay(t1 - t0, opt.clock, t0 - first_step)
            if change is not None:
                log.emit("straggler", **change)
            if pause > 0:
                time.sleep(pause)  # the injected slowdown itself, not synchronization
                t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            compute_s += t1 - t0
            comm_s += t2 - t1
            window.append(loss.item())
            progress.update(clock=opt.clock, loss=window[-1])
            if len(window) >= t.log_every:
                log.emit("train", clock=opt.clock, version=opt.version, loss=float(np.mean(window)),
                         epoch=opt.clock / per_epoch, compute_s=compute_s, comm_s=comm_s,
                         delay_s=straggler.delay_s)
                window.clear()
    except JobStopping:
        reason = "job stopping"
    except ServerUnavailable as exc:
        reason = f"server unavailable: {exc}"
        status = 1
    finally:
        log.emit("worker_stop", reason=reason, iterations=opt.clock, compute_s=compute_s, comm_s=comm_s,
                 delay_s=straggler.delay_s, pushes_sent=client.pushes_sent, pushes_acked=client.pushes_acked,
                 bytes_pushed=client.bytes_pushed, bytes_pulled=client.bytes_pulled,
                 compute_while_down_s=train_through.compute_while_down_s if train_through else 0.0,
                 still_detached=sorted(client.detached))
        opt.close()
        control.close()
        log.close()
    return status
