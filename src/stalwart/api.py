"""What a training script calls to be one of a job's workers (``stalwart run``).

Four functions beside :class:`~stalwart.worker.optimizer.ParameterServerOptimizer`,
each answered by this process's :class:`~stalwart.worker.session.WorkerSession`, made
from the environment the first time one is called (outside ``stalwart run`` they
raise :class:`~stalwart.worker.session.NotInJob`, which says what is missing)::

    import stalwart
    train_set = stalwart.shard(train_set)              # this worker's share of the data
    opt = stalwart.ParameterServerOptimizer(model)     # instead of torch.optim.SGD(...)
    ...
    stalwart.log(step=step, loss=loss.item(), accuracy=acc)

The learning rate and momentum are the job's (``--lr``, ``--momentum``): the servers
apply the update, so that every worker's step moves one shared model.
"""

from __future__ import annotations

from typing import Any


def _session():
    from .worker.session import WorkerSession
    return WorkerSession.from_env()


def worker_index() -> int:
    """This worker's index in the job, 0 .. num_workers() - 1."""
    return _session().index


def num_workers() -> int:
    """How many workers the job starts (workers that join it later are beyond these)."""
    return _session().job.cluster.workers


def shard(dataset, seed: int | None = None):
    """This worker's share of a map-style dataset, as a ``torch.utils.data.Subset``:
    the shares of the job's workers are disjoint and equal-sized (the remainder of an
    uneven split is left out), drawn by ``seed`` (the job's ``--seed`` by default). A
    worker that joined beyond them (index ``num_workers() + k``) shares worker ``k``'s."""
    from torch.utils.data import Subset

    from .data import shard_indices
    session = _session()
    chosen = session.job.train.seed if seed is None else seed
    workers = session.job.cluster.workers
    return Subset(dataset, shard_indices(len(dataset), workers, session.index % workers, chosen).tolist())


def join(run_dir: str, token: bytes | None = None) -> int:
    """Join the running job whose run directory is ``run_dir`` as one more worker (the
    job's token: given, or ``STALWART_TOKEN``, which the job must have been started
    with); returns this worker's index. Call it before the optimizer is made."""
    from .worker.session import WorkerSession
    return WorkerSession.join(run_dir, token).index


def log(**metrics: Any) -> None:
    """Record scalars (``step``, ``loss``, ``accuracy``, anything numeric) in the run's
    event log, its summary and plots (worker 0's ``accuracy`` is the run's accuracy
    curve and its final accuracy) and TensorBoard (``--tensorboard``)."""
    _session().metrics(**metrics)
