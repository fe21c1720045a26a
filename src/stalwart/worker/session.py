"""One worker process's place in a job: what a built-in worker and a user's script share.

A :class:`WorkerSession` is everything about a worker that is not its training loop:

* **membership**: it registers with the coordinator and renews its lease with
  heartbeats that carry its progress (iteration, loss, and whether it is training,
  waiting in a push+pull, or detached from a dead server), for the driver's display and
  for kill rules that fire at a clock;
* **its handle on the servers**: :meth:`connect` makes the client with the failover the
  job's recovery strategy calls for (and, for stateless servers, the training-through),
  on the job's layout: the built-in model's bounds, or the one the first worker of a
  script fixed (this worker's parameter count is checked against it);
* **the step's bracket**: the drop-in optimizer calls :meth:`before_sync` and
  :meth:`after_sync` around every push+pull, where the time since the last step is
  accounted as computation, the injected straggler delay is slept, and the time in the
  push+pull as communication;
* **its record**: the event log (``worker_start``, ``metrics`` from :func:`stalwart.log`,
  ``worker_stop`` with the client's counters), and TensorBoard for a script's metrics.

A built-in worker (:mod:`stalwart.worker.main`) makes one from its role spec; a script
run by ``stalwart run`` gets one from its environment (:meth:`from_env`: the spec's
path, its worker index and the job's token), the first time it calls into
:mod:`stalwart.api`; the session ends with the process (``atexit``) if the script does
not close its optimizer.
"""

from __future__ import annotations

import atexit
import functools
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..control import CoordinatorClient
from ..faults import Straggler, parse_straggler
from ..layout import ParameterLayout
from ..metrics import EventLog
from ..optim import optimizer_from_config
from ..spec import SPEC_ENV, TOKEN_ENV, WORKER_ENV, RoleSpec, job_token, token_from_env, worker_env
from .client import JobStopping, ParameterClient
from .failover import Detach, NoFailover, Reconnect
from .trainthrough import TrainThrough

WAITING_S = 0.05  # a step that has been syncing this long is waiting (at a barrier, or on its server)


class NotInJob(RuntimeError):
    """A script asked for its job outside ``stalwart run``; the message says what is missing."""


def reserve_worker_slot(spec: RoleSpec, token: bytes) -> int:
    """A free worker index in the running job of ``spec``, held for the process that joins."""
    from ..control import CoordinatorError
    control = CoordinatorClient(spec.coordinator, token, "client", 0, patience_s=3.0)
    try:
        return int(control.call("join_worker", pid=os.getpid())["index"])
    except CoordinatorError as exc:
        raise NotInJob(f"cannot join the job at {spec.coordinator}: {exc}") from None
    finally:
        control.close()


@dataclass
class Tally:
    """What the worker reports at its end."""
    compute_s: float = 0.0
    comm_s: float = 0.0
    reason: str = "finished"
    status: int = 0
    progress: dict = field(default_factory=lambda: {"clock": 0, "loss": None})


class WorkerSession:
    _current: "WorkerSession | None" = None  # a script's session (one per process)

    def __init__(self, spec: RoleSpec, index: int, token: bytes):
        self.spec, self.index, self.token = spec, index, token
        self.job = job = spec.job
        self.log = EventLog.for_role(spec.run_dir, "worker", index)
        self.tally = Tally()
        self.stopping = threading.Event()
        self.straggler = Straggler([parse_straggler(r) for r in job.faults.stragglers], index, job.train.seed)
        self._first_sync: float | None = None
        self._connect_start: float | None = None
        self._trained = False  # has a step completed yet
        self._last_sync_end = time.perf_counter()
        self._sync_start = 0.0
        self._client: ParameterClient | None = None
        self._through: TrainThrough | None = None
        self._tensorboard = None
        self._closed = False
        self.control = CoordinatorClient(spec.coordinator, token, "worker", index, give_up_s=job.control.patience_s)
        self.control.register(patience_s=job.control.patience_s)
        # The heartbeat thread sees only the view of the detached shards, never the model:
        # a daemon thread that dropped the last reference to the model's tensors during the
        # interpreter's shutdown would free them without the GIL, and abort the process.
        self._detached: dict = {}
        self.control.start_heartbeats(job.cluster.heartbeat_s, stats=self._heartbeat,
                                      on_state=lambda state: state != "running" and self.stopping.set())

    @classmethod
    def from_env(cls) -> "WorkerSession":
        """This process's session in the job ``stalwart run`` started it for."""
        if cls._current is not None:
            return cls._current
        missing = [name for name in (SPEC_ENV, WORKER_ENV, TOKEN_ENV) if not os.environ.get(name)]
        if missing:
            raise NotInJob(f"not inside a stalwart job ({', '.join(missing)} not set): run this script with "
                           f"`stalwart run [OPTIONS] -- python SCRIPT`, or give ParameterServerOptimizer a "
                           f"coordinator address and the job's token")
        try:
            spec = RoleSpec.load(os.environ[SPEC_ENV])
            index = int(os.environ[WORKER_ENV])
        except (OSError, ValueError, TypeError) as exc:
            raise NotInJob(f"the job in the environment cannot be read ({SPEC_ENV}={os.environ[SPEC_ENV]}, "
                           f"{WORKER_ENV}={os.environ[WORKER_ENV]}): {exc}") from None
        session = cls._current = cls(spec, index, token_from_env())
        atexit.register(session.close)
        session.log.emit("worker_start", command=spec.job.command)
        return session

    @classmethod
    def join(cls, run_dir: str | Path, token: bytes | None = None) -> "WorkerSession":
        """Join the running job of ``run_dir`` as a new worker of this process, in the
        lowest free worker slot (the token: given, or ``STALWART_TOKEN``)."""
        spec = cls.job_of(run_dir)
        try:
            token = token or job_token()
        except ValueError as exc:
            raise NotInJob(str(exc)) from None
        index = reserve_worker_slot(spec, token)
        os.environ.update(worker_env(Path(run_dir) / "spec.json", index, token))
        return cls.from_env()

    @staticmethod
    def job_of(run_dir: str | Path) -> RoleSpec:
        path = Path(run_dir) / "spec.json"
        try:
            return RoleSpec.load(path)
        except FileNotFoundError:
            raise NotInJob(f"{run_dir} is not the run directory of a job (no spec.json)") from None
        except (OSError, ValueError, TypeError) as exc:
            raise NotInJob(f"{path} cannot be read: {exc}") from None

    # --- the servers ------------------------------------------------------------------
    def bounds(self, model: torch.nn.Module) -> list[int]:
        """The job's shard bounds, checked against (or fixed by) this worker's model."""
        layout = ParameterLayout.from_module(model)
        if self.spec.bounds and self.spec.bounds[-1] == layout.total:
            return self.spec.bounds
        return self.control.layout(layout.total, timeout_s=self.job.control.patience_s, digest=layout.digest())

    def connect(self, model: torch.nn.Module, buffer_size: int = 0) -> tuple[ParameterClient, TrainThrough | None]:
        """A client of every shard, with the failover (and, for stateless servers, the
        training-through) that the recovery strategy calls for."""
        job, r, control = self.job, self.job.recovery, self.control
        self._connect_start = time.perf_counter()
        bounds = self.bounds(model)

        def resolve(failed: list[str], wait_s: float) -> tuple[list[str], list[str]]:
            """Where the shards are now, after reporting the servers we lost."""
            try:
                return control.relocate(failed, timeout_s=wait_s)
            except ConnectionError:
                if control.state != "running":
                    raise JobStopping() from None
                raise

        policy = {"none": NoFailover, "stateless": Detach}.get(r.strategy, Reconnect)
        shards = control.shard_map(timeout_s=job.control.patience_s)
        client = ParameterClient(shards, bounds, self.token, worker=self.index, tails=control.tails,
                                 transport=job.cluster.transport, buffer_size=buffer_size,
                                 failover=policy(resolve, r.reconnect_s, on_event=self.log.emit))
        through = None
        if r.strategy == "stateless":
            # Alone on its copy, a worker steps as the servers would: the job's own rule.
            local_optimizer = functools.partial(optimizer_from_config, job.optimizer)
            through = TrainThrough(client, local_optimizer, bound=r.backlog_max, when_full=r.when_full,
                                   reconnect_s=r.reconnect_s, on_event=self.log.emit)
        self._client, self._through = client, through
        self._detached["shards"] = client.detached
        self._last_sync_end = time.perf_counter()
        return client, through

    # --- the step's bracket -------------------------------------------------------------
    def before_sync(self, clock: int) -> None:
        """A gradient is ready: account its computation, and slow down if told to."""
        if self.stopping.is_set():
            raise JobStopping()
        now = time.perf_counter()
        step_s = now - self._last_sync_end
        self._first_sync = self._first_sync or now
        pause, change = self.straggler.delay(step_s, clock, now - self._first_sync)
        if change is not None:
            self.log.emit("straggler", **change)
        if pause > 0:
            time.sleep(pause)  # the injected slowdown itself, not synchronization
        self._sync_start = time.perf_counter()
        self.tally.compute_s += self._sync_start - now + step_s
        self.tally.progress["sync_since"] = time.monotonic()

    def after_sync(self, clock: int) -> None:
        self._last_sync_end = time.perf_counter()
        self.tally.comm_s += self._last_sync_end - self._sync_start
        self.tally.progress.update(clock=clock, sync_since=None)
        if not self._trained:
            # How soon a worker trains once it reaches for the servers (a joiner's figure).
            self._trained = True
            self.log.emit("first_step", clock=clock,
                          after_connect_s=self._last_sync_end - (self._connect_start or self._last_sync_end))

    def _heartbeat(self) -> dict:
        """What a heartbeat tells the coordinator: iteration, loss, and what the worker is
        doing now (``training``, ``waiting`` in a push+pull, or ``detached`` from a server
        and training locally), for the driver's live display."""
        progress = dict(self.tally.progress)
        since = progress.pop("sync_since", None)
        if self._detached.get("shards"):
            state = "detached"
        elif since is not None and time.monotonic() - since > WAITING_S:
            state = "waiting"
        else:
            state = "training"
        return {**progress, "state": state}

    # --- the record -----------------------------------------------------------------------
    def metrics(self, **values: Any) -> None:
        """Scalars a script logs (``stalwart.log``): into the event log, the heartbeat's
        loss, and TensorBoard when the job writes it."""
        bad = [k for k, v in values.items() if not isinstance(v, (int, float)) or isinstance(v, bool)
               or not math.isfinite(v)]
        if bad:
            raise ValueError(f"stalwart.log takes finite numbers; {', '.join(bad)} "
                             f"{'is' if len(bad) == 1 else 'are'} not")
        values = {k: float(v) if isinstance(v, float) else v for k, v in values.items()}
        if "loss" in values:
            self.tally.progress["loss"] = values["loss"]
        self.log.emit("metrics", clock=self.tally.progress["clock"], **values)
        if self.job.tensorboard is not None:
            if self._tensorboard is None:
                from torch.utils.tensorboard import SummaryWriter
                self._tensorboard = SummaryWriter(log_dir=str(self.job.tensorboard / f"worker-{self.index}"))
            step = int(values.get("step", self.tally.progress["clock"]))
            for name, value in values.items():
                if name != "step":
                    self._tensorboard.add_scalar(name, value, step)

    def close(self, iterations: int | None = None) -> None:
        """Log the end, leave the servers (no barrier waits for this worker) and the job."""
        if self._closed:
            return
        self._closed = True
        client, through = self._client, self._through
        counters = {} if client is None else dict(
            pushes_sent=client.pushes_sent, pushes_acked=client.pushes_acked, bytes_pushed=client.bytes_pushed,
            bytes_pulled=client.bytes_pulled, bytes_by_path=client.bytes_by_path,
            still_detached=sorted(client.detached))
        self.log.emit("worker_stop", reason=self.tally.reason, compute_s=self.tally.compute_s,
                      iterations=self.tally.progress["clock"] if iterations is None else iterations,
                      comm_s=self.tally.comm_s, delay_s=self.straggler.delay_s,
                      compute_while_down_s=through.compute_while_down_s if through else 0.0, **counters)
        if client is not None and client.conns:
            client.goodbye()
        if self._tensorboard is not None:
            self._tensorboard.close()
        self.control.close()
        self.log.close()
