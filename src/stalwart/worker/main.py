"""The worker process: train on its own shard of the data until the job stops.

Three parts, each its own function: the data and model this worker trains
(:func:`_local_work`), its handle on the servers (:func:`_connect`: the coordinator, a
client with the failover its recovery strategy calls for, the drop-in optimizer) and
the training loop itself (:func:`_train`), which is an ordinary PyTorch loop around
``opt.step()`` with the injected straggler delay and the loss events added.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import JobConfig
from ..control import CoordinatorClient
from ..data import load_dataset, shard_indices
from ..faults import Straggler, parse_straggler
from ..metrics import EventLog
from ..models import build_model
from ..optim import optimizer_from_config
from ..spec import RoleSpec, token_from_env
from .client import JobStopping, ParameterClient
from .failover import Detach, NoFailover, Reconnect, ServerUnavailable
from .optimizer import ParameterServerOptimizer
from .evaluator import score
from .trainthrough import TrainThrough


@dataclass
class LocalWork:
    """This worker's part of the training set, and the model it trains."""
    x: torch.Tensor
    y: torch.Tensor
    model: torch.nn.Module
    batch: int
    per_epoch: int
    limit: int | None  # iterations to run, when the job is bounded by epochs
    x_test: torch.Tensor | None = None  # worker 0 only: its local copy is evaluated while detached
    y_test: torch.Tensor | None = None


@dataclass
class Tally:
    """What the worker reports at its end."""
    compute_s: float = 0.0
    comm_s: float = 0.0
    reason: str = "finished"
    status: int = 0
    delay_s: float = 0.0  # injected straggler delay
    progress: dict = field(default_factory=lambda: {"clock": 0, "loss": None})


def _local_work(job: JobConfig, index: int) -> LocalWork:
    d, t = job.data, job.train
    ds = load_dataset(d.dataset, seed=t.seed, samples=d.samples, features=d.features, data_dir=d.data_dir)
    mine = shard_indices(len(ds.y_train), job.cluster.workers, index, t.seed)
    x, y = torch.from_numpy(ds.x_train[mine]), torch.from_numpy(ds.y_train[mine])
    model = build_model(job.model.name, ds.input_shape, ds.num_classes, seed=t.seed, hidden=job.model.hidden)
    batch = min(d.batch_size, len(y))
    per_epoch = len(y) // batch
    limit = math.ceil(t.epochs * per_epoch) if t.epochs is not None else None
    local_eval = index == 0 and job.recovery.strategy == "stateless"
    return LocalWork(x, y, model, batch, per_epoch, limit,
                     torch.from_numpy(ds.x_test) if local_eval else None,
                     torch.from_numpy(ds.y_test) if local_eval else None)


def _connect(spec: RoleSpec, index: int, token: bytes, control: CoordinatorClient, model: torch.nn.Module,
             log: EventLog) -> ParameterServerOptimizer:
    """The drop-in optimizer over a client of every shard, with the failover (and, for
    stateless servers, the training-through) that the recovery strategy calls for."""
    job, r = spec.job, spec.job.recovery

    def resolve(failed: list[str], wait_s: float) -> tuple[list[str], list[str]]:
        """Where the shards are now, after reporting the servers we lost."""
        try:
            return control.relocate(failed, timeout_s=wait_s)
        except ConnectionError:
            if control.state != "running":
                raise JobStopping() from None
            raise

    policy = {"none": NoFailover, "stateless": Detach}.get(r.strategy, Reconnect)
    client = ParameterClient(control.shard_map(), spec.bounds, token, worker=index, tails=control.tails,
                             transport=job.cluster.transport,
                             failover=policy(resolve, r.reconnect_s, on_event=log.emit))
    train_through = None
    if r.strategy == "stateless":
        # Alone on its copy, a worker steps as the servers would: the job's own rule.
        local_optimizer = functools.partial(optimizer_from_config, job.optimizer)
        train_through = TrainThrough(client, local_optimizer, bound=r.backlog_max, when_full=r.when_full,
                                     reconnect_s=r.reconnect_s, on_event=log.emit)
    return ParameterServerOptimizer(model, client=client, train_through=train_through)


def _train(job: JobConfig, index: int, work: LocalWork, opt: ParameterServerOptimizer, log: EventLog,
           stopping: threading.Event, tally: Tally) -> None:
    t = job.train
    straggler = Straggler([parse_straggler(r) for r in job.faults.stragglers], index, t.seed)
    rng = np.random.default_rng([t.seed, index])
    loss_fn = torch.nn.CrossEntropyLoss()
    window: list[float] = []
    order = rng.permutation(len(work.y))
    first_step = None
    next_local_eval = 0.0
    try:
        while work.limit is None or opt.clock < work.limit:
            if stopping.is_set():
                tally.reason = "job stopping"
                break
            pos = (opt.clock % work.per_epoch) * work.batch
            if pos == 0 and opt.clock:
                order = rng.permutation(len(work.y))
            take = order[pos:pos + work.batch]
            t0 = time.perf_counter()
            work.model.train()
            opt.zero_grad()
            loss = loss_fn(work.model(work.x[take]), work.y[take])
            loss.backward()
            t1 = time.perf_counter()
            first_step = first_step or t0
            pause, change = straggler.delay(t1 - t0, opt.clock, t0 - first_step)
            if change is not None:
                log.emit("straggler", **change)
            if pause > 0:
                time.sleep(pause)  # the injected slowdown itself, not synchronization
                t1 = time.perf_counter()
            tally.progress["sync_since"] = time.monotonic()
            opt.step()
            tally.progress["sync_since"] = None
            t2 = time.perf_counter()
            tally.compute_s += t1 - t0
            tally.comm_s += t2 - t1
            window.append(loss.item())
            tally.progress.update(clock=opt.clock, loss=window[-1])
            next_local_eval = _local_eval(work, opt, log, next_local_eval, t.eval_interval_s)
            if len(window) >= t.log_every:
                log.emit("train", clock=opt.clock, version=opt.version, loss=float(np.mean(window)),
                         epoch=opt.clock / work.per_epoch, compute_s=tally.compute_s, comm_s=tally.comm_s,
                         delay_s=straggler.delay_s)
                window.clear()
    except JobStopping:
        tally.reason = "job stopping"
    except ServerUnavailable as exc:
        tally.reason, tally.status = f"server unavailable: {exc}", 1
    finally:
        tally.delay_s = straggler.delay_s


def _local_eval(work: LocalWork, opt: ParameterServerOptimizer, log: EventLog, due: float, every_s: float) -> float:
    """While detached (its servers down), worker 0 scores its own copy of the model at
    the evaluation cadence, so that the accuracy curve goes on through the outage
    (``local_eval`` events, drawn as the local copy's). Returns when the next is due."""
    if work.x_test is None or not opt.client.detached:
        return due  # every step of every worker comes here: the cheap answers first
    now = time.monotonic()
    if now < due:
        return due
    result = score(work.model, work.x_test, work.y_test)
    spent = time.monotonic() - now
    opt.train_through.not_training(spent)
    log.emit("local_eval", clock=opt.clock, eval_s=round(spent, 4), **result)
    return now + every_s


WAITING_S = 0.05  # a step that has been syncing this long is waiting (at a barrier, or on its server)


def _heartbeat(tally: Tally, detached) -> dict:
    """What a heartbeat tells the coordinator: iteration, loss, and what the worker is
    doing now (``training``, ``waiting`` in a push+pull, or ``detached`` from a server
    and training locally), for the driver's live display."""
    progress = dict(tally.progress)
    since = progress.pop("sync_since", None)
    if detached:
        state = "detached"
    elif since is not None and time.monotonic() - since > WAITING_S:
        state = "waiting"
    else:
        state = "training"
    return {**progress, "state": state}


def run_worker(spec: RoleSpec, index: int) -> int:
    job, token = spec.job, token_from_env()
    torch.set_num_threads(1)  # N workers share the cores; one thread each avoids thrashing
    log = EventLog.for_role(spec.run_dir, "worker", index)
    work = _local_work(job, index)
    stopping, tally = threading.Event(), Tally()
    control = CoordinatorClient(spec.coordinator, token, "worker", index, give_up_s=job.control.patience_s)
    control.register(patience_s=job.control.patience_s)
    # The heartbeat thread sees only the view of the detached shards, never the optimizer:
    # a daemon thread that dropped the last reference to the model's tensors during the
    # interpreter's shutdown would free them without the GIL, and abort the process.
    detached: dict = {}
    control.start_heartbeats(job.cluster.heartbeat_s, stats=lambda: _heartbeat(tally, detached.get("shards")),
                             on_state=lambda state: state != "running" and stopping.set())
    try:
        opt = _connect(spec, index, token, control, work.model, log)
        detached["shards"] = opt.client.detached
    except JobStopping:  # the job ended while this worker was still finding its servers
        log.emit("worker_stop", reason="job stopping", iterations=0)
        control.close()
        log.close()
        return 0
    log.emit("worker_start", examples=len(work.y), batch=work.batch, iterations_per_epoch=work.per_epoch,
             limit=work.limit)
    try:
        _train(job, index, work, opt, log, stopping, tally)
    finally:
        client, through = opt.client, opt.train_through
        log.emit("worker_stop", reason=tally.reason, iterations=opt.clock, compute_s=tally.compute_s,
                 comm_s=tally.comm_s, delay_s=tally.delay_s, pushes_sent=client.pushes_sent,
                 pushes_acked=client.pushes_acked, bytes_pushed=client.bytes_pushed,
                 bytes_pulled=client.bytes_pulled, bytes_by_path=client.bytes_by_path,
                 compute_while_down_s=through.compute_while_down_s if through else 0.0,
                 still_detached=sorted(client.detached))
        opt.close()
        control.close()
        log.close()
    return tally.status
