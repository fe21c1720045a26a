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
import time
from datetime import datetime
from pathlib import Path

from ..config import JobConfig
from ..data import load_dataset
from ..faults import FaultInjector, parse_kill
from ..layout import ParameterLayout
from ..metrics import EventLog
from ..metrics.progress import Progress
from ..metrics.summary import write_summary
from ..metrics.tensorboard import TensorBoardSink
from ..models import build_model
from .base import Exit
from .cluster import Cluster, ClusterError

STOP_TIMEOUT_S = 30.0


def _log_exit(log: EventLog, e: Exit) -> None:
    log.emit("role_exit", member_role=e.role, member_index=e.index, returncode=e.returncode,
             cpu_s=e.cpu_s, max_rss_mb=e.max_rss_mb)


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


class JobFailed(RuntimeError):
    """The job could not run to its end; the message says which role failed and how."""


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
        # Data and model once here: fills the data cache and fixes the layout that
        # every role shares, and fails early (before any process) on a bad setting.
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
                cluster = Cluster.start(c, run_dir, bounds, ds.input_shape, ds.num_classes, self.placement)
            except ClusterError as exc:
                raise JobFailed(f"the cluster did not start: {exc}") from None
            launcher = cluster.launcher
            for w in range(c.cluster.workers):
                launcher.start("worker", w)
            log.emit("launched", servers=c.cluster.servers, workers=c.cluster.workers,
                     parameters=layout.total, bounds=bounds, **launcher.describe())
            with progress:
                status = self._drive(cluster, model, ds, log, progress)
        except KeyboardInterrupt:
            status, error = "interrupted", "interrupted by the user (Ctrl-C)"
        except JobFailed as exc:
            status, error = "failed", str(exc)
        finally:
            for e in launcher.shutdown(grace_s=5.0) if launcher is not None else ():
                _log_exit(log, e)
            log.emit("job_end", status=status, error=error)
            log.close()
            self.summary = write_summary(run_dir, status=status, error=error)
        if status == "failed":
            raise JobFailed(error)
        if status == "interrupted":
            raise KeyboardInterrupt(error)
        return self.summary

    @staticmethod
    def _global_clock(control) -> int | None:
        """The slowest live worker's iteration count, from its heartbeats."""
        clocks = [m["stats"]["clock"] for m in control.call("status")["members"]
                  if m["role"] == "worker" and m["alive"] and (m.get("stats") or {}).get("clock") is not None]
        return min(clocks) if clocks else None

    # --- the driver loop -----------------------------------------------------------
    def _drive(self, cluster: Cluster, model, ds, log: EventLog, progress: Progress) -> str:
        from ..worker.client import ParameterClient, ServerError
        from ..worker.failover import NoFailover, Reconnect
        from ..worker.evaluator import Evaluator
        c = self.config

        injector: FaultInjector | None = None

        def check(exits: list[Exit]) -> None:
            self.interrupt.check()
            for e in exits:
                _log_exit(log, e)
                if injector is not None and injector.expects_exit(e.role, e.index):
                    continue  # killed on purpose: the job goes on
                if e.returncode == 0 and e.role == "worker":
                    finished.add(e.index)
                elif e.role == "coordinator" and not shutting_down:
                    raise JobFailed(f"{e.describe()}; the coordinator's state (membership, chains) is not "
                                    f"persisted, so the job cannot go on without it")
                elif e.returncode != 0 or not shutting_down:
                    raise JobFailed(f"{e.describe()}; stopping the job (see {self.run_dir}/logs/"
                                    f"{e.role}-{e.index}.log)")

        finished: set[int] = set()
        shutting_down = False
        launcher, spec, token = cluster.launcher, cluster.spec, cluster.token
        try:
            control, shards = cluster.connect("driver", check)
        except ClusterError as exc:
            raise JobFailed(str(exc)) from None

        def locate(position: str, shard: int) -> int | None:
            """The server process at ``position`` of ``shard``'s chain right now."""
            members = [m[0] for m in control.call("chain", shard=shard)["members"]]
            if len(members) < (3 if position == "middle" else 1):
                return None
            return {"head": members[0], "middle": members[len(members) // 2], "tail": members[-1]}[position]

        injector = FaultInjector([parse_kill(k) for k in c.faults.kills], launcher, log, c.faults.down_s,
                                 locate=locate)
        # The driver must never block long on a dead server: it is the one that restarts it.
        client = ParameterClient(shards, spec.bounds, token, transport=c.cluster.transport, tails=control.tails,
                                 failover=(NoFailover if c.recovery.strategy == "none" else Reconnect)(
                                     lambda failed: control.relocate(failed, timeout_s=0.5), 0.25))
        evaluator = Evaluator(model, ds.x_test, ds.y_test, client)

        tensorboard = TensorBoardSink(c.tensorboard) if c.tensorboard is not None else None
        # Training starts when the first worker has initialized every shard, not at
        # process start-up; wait for that on the control plane, watching for crashes.
        while not all((m["stats"] or {}).get("initialized") for m in control.call("status")["members"]
                      if m["role"] == "server"):
            check(launcher.wait(0.05))
        t_start = time.monotonic()
        log.emit("train_start")
        reason = None
        next_eval = t_start
        while reason is None:
            now = time.monotonic()
            wake = min(next_eval, t_start + injector.next_due_s())
            if injector.waiting_on_clock():
                wake = min(wake, now + 0.1)
            check(launcher.wait(max(0.0, wake - now)))
            if len(finished) == c.cluster.workers:
                reason = "every worker finished its epochs"
                break
            if injector.rules:
                clock = self._global_clock(control) if injector.waiting_on_clock() else None
                for role, index in injector.tick(time.monotonic() - t_start, clock):
                    if role == "coordinator":
                        raise JobFailed("the coordinator was killed (fault injection); its state (membership, "
                                        "chains) is not persisted, so the job cannot go on without it")
                    if role == "server" and c.recovery.strategy == "none":
                        raise JobFailed(f"server {index} was killed (fault injection) and recovery is 'none': "
                                        f"training cannot go on; use --recovery checkpoint, chain or stateless")
            if time.monotonic() < next_eval:
                continue
            next_eval += c.train.eval_interval_s
            try:
                result = evaluator.evaluate()
            except (ConnectionError, OSError, ServerError) as exc:
                elapsed = time.monotonic() - t_start
                log.emit("eval_skipped", elapsed_s=elapsed, reason=str(exc))
                if c.train.duration_s is not None and elapsed >= c.train.duration_s:
                    reason = f"duration of {c.train.duration_s:g}s reached"
                continue
            elapsed = time.monotonic() - t_start
            log.emit("eval", elapsed_s=elapsed, **result)
            workers = [m for m in control.call("status")["members"] if m["role"] == "worker"]
            losses = [w["stats"]["loss"] for w in workers if (w.get("stats") or {}).get("loss") is not None]
            train_loss = sum(losses) / len(losses) if losses else None
            progress.update(elapsed, result, workers, train_loss)
            if tensorboard is not None:
                tensorboard.add(elapsed, result, train_loss)
            if c.train.duration_s is not None and elapsed >= c.train.duration_s:
                reason = f"duration of {c.train.duration_s:g}s reached"
            elif c.train.stop_at_target and result["accuracy"] >= c.train.target_accuracy:
                reason = f"target accuracy {c.train.target_accuracy:g} reached"

        log.emit("stopping", reason=reason)
        control.call("stop", reason=reason)
        workers = {("worker", w) for w in range(c.cluster.workers)}
        check(launcher.wait_for(workers, STOP_TIMEOUT_S))
        if workers & set(launcher.running()):
            raise JobFailed(f"workers did not stop within {STOP_TIMEOUT_S}s of being asked")
        elapsed = time.monotonic() - t_start
        try:
            result = evaluator.evaluate()
        except (ConnectionError, OSError, ServerError) as exc:
            log.emit("eval_skipped", elapsed_s=elapsed, final=True, reason=str(exc))
        else:
            log.emit("eval", elapsed_s=elapsed, final=True, **result)
            progress.update(elapsed, result, [], None)
            if tensorboard is not None:
                tensorboard.add(elapsed, result, None)
        if tensorboard is not None:
            tensorboard.close()
        client.close()
        shutting_down = True
        control.call("shutdown", reason=reason)
        control.close()
        check(launcher.wait_for(set(launcher.running()), STOP_TIMEOUT_S))
        return "completed"
