"""The built-in worker process: train on its own shard of the data until the job stops.

Two parts, each its own function: the data and model this worker trains, on the
device ``train.device`` names (:func:`_local_work`), and the training loop itself
(:func:`_train`), an ordinary PyTorch loop around the drop-in optimizer's ``step()``
with loss events added. Everything else a worker is (its membership, its handle on the
servers, the timing and the injected straggler delay around each step, its record) is
the :class:`~stalwart.worker.session.WorkerSession` that a user's script has too.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..config import JobConfig
from ..data import load_dataset, shard_indices
from ..metrics import EventLog
from ..models import build_model, device_for
from ..spec import RoleSpec, token_from_env
from .client import JobStopping
from .evaluator import score
from .failover import ServerUnavailable
from .optimizer import ParameterServerOptimizer
from .session import WorkerSession


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


def _local_work(job: JobConfig, index: int) -> LocalWork:
    d, t = job.data, job.train
    device = device_for(t.device)
    ds = load_dataset(d.dataset, seed=t.seed, samples=d.samples, features=d.features, data_dir=d.data_dir)
    mine = shard_indices(len(ds.y_train), job.cluster.workers, index, t.seed)
    x, y = torch.from_numpy(ds.x_train[mine]).to(device), torch.from_numpy(ds.y_train[mine]).to(device)
    model = build_model(job.model.name, ds.input_shape, ds.num_classes, seed=t.seed,
                        hidden=job.model.hidden).to(device)
    batch = min(d.batch_size, len(y))
    per_epoch = len(y) // batch
    limit = math.ceil(t.epochs * per_epoch) if t.epochs is not None else None
    local_eval = index == 0 and job.recovery.strategy == "stateless"
    return LocalWork(x, y, model, batch, per_epoch, limit,
                     torch.from_numpy(ds.x_test).to(device) if local_eval else None,
                     torch.from_numpy(ds.y_test).to(device) if local_eval else None)


def _train(job: JobConfig, work: LocalWork, opt: ParameterServerOptimizer, session: WorkerSession) -> None:
    """The loop a user would write, around ``opt.step()``; the session times it, slows
    it down when told to, and raises JobStopping there when the job stops."""
    t, index, tally, log = job.train, session.index, session.tally, session.log
    rng = np.random.default_rng([t.seed, index])
    loss_fn = torch.nn.CrossEntropyLoss()
    window: list[float] = []
    order = rng.permutation(len(work.y))
    next_local_eval = 0.0
    try:
        while work.limit is None or opt.clock < work.limit:
            pos = (opt.clock % work.per_epoch) * work.batch
            if pos == 0 and opt.clock:
                order = rng.permutation(len(work.y))
            take = torch.from_numpy(order[pos:pos + work.batch]).to(work.x.device)
            work.model.train()
            opt.zero_grad()
            loss = loss_fn(work.model(work.x[take]), work.y[take])
            loss.backward()
            opt.step()
            window.append(loss.item())
            tally.progress["loss"] = window[-1]
            next_local_eval = _local_eval(work, opt, log, next_local_eval, t.eval_interval_s)
            if len(window) >= t.log_every:
                log.emit("train", clock=opt.clock, version=opt.version, loss=float(np.mean(window)),
                         epoch=opt.clock / work.per_epoch, compute_s=tally.compute_s, comm_s=tally.comm_s,
                         delay_s=session.straggler.delay_s)
                window.clear()
    except JobStopping:
        tally.reason = "job stopping"
    except ServerUnavailable as exc:
        tally.reason, tally.status = f"server unavailable: {exc}", 1


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


def run_worker(spec: RoleSpec, index: int) -> int:
    job = spec.job
    torch.set_num_threads(1)  # N workers share the cores; one thread each avoids thrashing
    work = _local_work(job, index)
    session = WorkerSession(spec, index, token_from_env())
    try:
        opt = ParameterServerOptimizer(work.model, session=session)
    except JobStopping:  # the job ended while this worker was still finding its servers
        session.tally.reason = "job stopping"
        session.close(iterations=0)
        return 0
    session.log.emit("worker_start", examples=len(work.y), batch=work.batch, iterations_per_epoch=work.per_epoch,
                     limit=work.limit, device=str(opt.flat.device))
    try:
        _train(job, work, opt, session)
    finally:
        opt.close()
    return session.tally.status
