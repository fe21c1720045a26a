"""A training job, from configuration to run directory.

:class:`Job` is the driver: it prepares the data and the parameter layout, starts the
coordinator, the servers and the workers through a launcher, evaluates the servers'
model on the test set as an observer, decides when to stop, and stops everything in
order: workers first (they leave their barriers), then a final evaluation, then the
servers and the coordinator. Any role that dies unasked stops the job with a message
that names it. Whatever happens, the run directory ends with ``summary.json``.
"""

from __future__ import annotations

import json
import signal
import threading
from datetime import datetime
from pathlib import Path

from ..config import JobConfig
from ..data import load_dataset
from ..layout import ParameterLayout
from ..metrics import EventLog
from ..metrics.progress import Progress
from ..metrics.summary import write_summary
from ..models import build_model, device_for
from .base import LaunchError
from .driver import Driver, JobFailed, log_exit
from .cluster import Cluster, ClusterError

class DeferredInterrupt:
    """Ctrl-C as a request that the driver acts on where it is safe to, not as an
    exception raised wherever the main thread happens to be.

    Python raises KeyboardInterrupt between any two bytecodes, also inside a ``with
    lock:`` that has taken the lock and not yet entered its block; the shutdown that
    follows would then wait on that lock for ever. So the first Ctrl-C only sets a flag,
    which :meth:`check` turns into KeyboardInterrupt at the driver's waits (every few
    tenths of a second); a second Ctrl-C, from a user who will not wait, raises at once.
    Outside the main thread (where signals cannot be handled) it changes nothing.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "DeferredInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Job:
    def __init__(self, config: JobConfig, placement: dict[str, dict] | None = None):
        self.config = config
        self.placement = placement  # where each role runs (netlab); None: all here
        self.run_dir: Path | None = None
        self.summary: dict | None = None
        self.interrupt = DeferredInterrupt()

    # --- set-up ------------------------------------------------------------------
    def _make_run_dir(self) -> Path:
        c = self.config
        name = c.name or f"{datetime.now():%Y%m%d-%H%M%S}-{c.sync.policy.replace(':', '')}-w{c.cluster.workers}s{c.cluster.servers}"
        run_dir = Path(c.out) / name
        suffix = 1
        while run_dir.exists():
            suffix += 1
            run_dir = Path(c.out) / f"{name}-{suffix}"
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(c.dump_yaml())
        return run_dir

    def run(self) -> dict:
        with self.interrupt:
            return self._run()

    def _run(self) -> dict:
        c = self.config
        self.run_dir = run_dir = self._make_run_dir()
        log = EventLog.for_role(run_dir, "driver", 0)
        log.emit("job_start", config=c.model_dump(mode="json"))
        ds = model = None
        bounds: list[int] = []  # a script's: fixed by its first worker (see the coordinator)
        if not c.command:
            # Data and model once here: fills the data cache and fixes the layout that
            # every role shares, and fails early (before any process) on a bad setting.
            device_for(c.train.device)  # (the driver's host stands for the workers' here)
            ds = load_dataset(c.data.dataset, seed=c.train.seed, samples=c.data.samples,
                              features=c.data.features, data_dir=c.data.data_dir)
            model = build_model(c.model.name, ds.input_shape, ds.num_classes, seed=c.train.seed,
                                hidden=c.model.hidden)
            layout = ParameterLayout.from_module(model)
            bounds = layout.shard_bounds(c.cluster.servers)
            (run_dir / "layout.json").write_text(json.dumps(
                {"total": layout.total, "bounds": bounds, "entries": layout.to_json()}, indent=1))

        progress = Progress(enabled=c.progress, target=c.train.target_accuracy)
        status, error, launcher = "completed", None, None
        try:
            try:
                cluster = Cluster.start(c, run_dir, bounds, ds.input_shape if ds else (1,),
                                        ds.num_classes if ds else 0, self.placement)
            except ClusterError as exc:
                raise JobFailed(f"the cluster did not start: {exc}") from None
            launcher = cluster.launcher
            try:
                for w in range(c.cluster.workers):
                    launcher.start("worker", w)
            except LaunchError as exc:
                raise JobFailed(str(exc)) from None
            log.emit("launched", servers=c.cluster.servers, workers=c.cluster.workers,
                     parameters=bounds[-1] if bounds else None, bounds=bounds, command=c.command,
                     **launcher.describe())
            with progress:
                status = Driver(c, cluster, model, ds, log, progress, self.interrupt.check,
                                f"{run_dir}/logs").run()
        except KeyboardInterrupt:
            status, error = "interrupted", "interrupted by the user (Ctrl-C)"
        except JobFailed as exc:
            status, error = "failed", str(exc)
        finally:
            for e in launcher.shutdown(grace_s=5.0) if launcher is not None else ():
                log_exit(log, e)
            log.emit("job_end", status=status, error=error)
            log.close()
            self.summary = write_summary(run_dir, status=status, error=error)
        if status == "failed":
            raise JobFailed(error)
        if status == "interrupted":
            raise KeyboardInterrupt(error)
        return self.summary
