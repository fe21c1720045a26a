"""The driver loop of a running job: watch the roles, inject faults, evaluate, stop.

:class:`Driver` is what :class:`~stalwart.launch.job.Job` runs once its cluster is up.
Each concern is one method: :meth:`Driver.check` (a role that exited: expected, a
finished worker, or the end of the job), :meth:`Driver._inject` (the fault schedule),
:meth:`Driver._evaluate` (one test pass as an observer, with the live display, which a
:class:`~stalwart.launch.watch.ClusterWatch` feeds, and TensorBoard) and :meth:`Driver._stop` (workers first, so that they leave their
barriers, then a final evaluation, then the servers and the coordinator).

A job whose workers are a user's command (``stalwart run``) has no model here to
evaluate: the driver then supervises and injects faults without evaluating, the job
ends when every worker's command has exited 0 (or at ``train.duration_s``, if given),
and a command that fails ends it with its exit status and the last lines of its stderr.

The coordinator is one more role the driver supervises, not one it depends on: while it
is down (killed, or restarting) the driver keeps evaluating and injecting, shows the
last membership it read, and restarts a coordinator that died without being killed on
purpose (up to :data:`COORDINATOR_RESTARTS` times). Its own requests never wait for the
coordinator, since it is the one that brings it back; :meth:`Driver._control` retries
those that must succeed (stopping the job) while it keeps watching the roles.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from ..config import JobConfig
from ..control import CoordinatorUnavailable
from ..faults import FaultInjector, parse_kill
from ..metrics import EventLog
from ..metrics.progress import Progress
from ..metrics.tensorboard import TensorBoardSink
from ..recovery.chain import Member
from ..worker.client import ParameterClient, ServerError
from ..worker.failover import NoFailover, Reconnect
from .base import Exit
from .cluster import Cluster, ClusterError
from .watch import ClusterWatch

STOP_TIMEOUT_S = 30.0
COORDINATOR_RESTARTS = 5  # unplanned coordinator deaths the driver restarts before giving up


class JobFailed(RuntimeError):
    """The job could not run to its end; the message says which role failed and how."""


def log_exit(log: EventLog, e: Exit) -> None:
    log.emit("role_exit", member_role=e.role, member_index=e.index, returncode=e.returncode,
             cpu_s=e.cpu_s, max_rss_mb=e.max_rss_mb)


class Driver:
    def __init__(self, config: JobConfig, cluster: Cluster, model, ds, log: EventLog, progress: Progress,
                 interrupted: Callable[[], None], logs_dir: str):
        self.config, self.cluster, self.log, self.progress = config, cluster, log, progress
        self.interrupted, self.logs_dir = interrupted, logs_dir
        self.launcher = cluster.launcher
        self.finished: set[int] = set()   # workers that ended their epochs
        self.shutting_down = False
        self.coordinator_restarts = 0
        self.t_start: float | None = None  # when training started (the clock of kills and restarts)
        self.last_status: dict = {"members": [], "chains": []}  # for the display while it is down
        self.injector: FaultInjector | None = None
        self.script = bool(config.command)
        try:
            self.control, shards = cluster.connect("driver", self.check, shard_map=not self.script)
        except ClusterError as exc:
            raise JobFailed(str(exc)) from None
        self.injector = FaultInjector([parse_kill(k) for k in config.faults.kills], self.launcher, log,
                                      config.faults.down_s, locate=self._locate)
        self.client, self.evaluator = None, None
        if not self.script:
            # The driver must never block long on a dead server: it is the one that restarts it.
            failover = NoFailover if config.recovery.strategy == "none" else Reconnect
            self.client = ParameterClient(shards, cluster.spec.bounds, cluster.token, transport=config.cluster.transport,
                                          tails=self.control.tails,
                                          failover=failover(lambda failed, wait_s: self.control.relocate(failed, timeout_s=min(wait_s, 0.5)),
                                                            0.25))
            # torch, which the driver alone needs: every role process imports this package
            # (its entry point lives here), and servers must start without it.
            from ..worker.evaluator import Evaluator
            self.evaluator = Evaluator(model, ds.x_test, ds.y_test, self.client,
                                       subset=config.train.eval_subset, seed=config.train.seed)
        # A script's workers write their own metrics there (stalwart.log).
        self.tensorboard = TensorBoardSink(config.tensorboard) \
            if config.tensorboard is not None and not self.script else None
        self.watch = ClusterWatch(config, progress, self.injector, self.finished)
        log.listeners.append(self.watch.on_event)

    # --- the roles ---------------------------------------------------------------------
    def check(self, exits: list[Exit]) -> None:
        """Act on roles that exited: a kill we made, a finished worker, or the job's end."""
        self.interrupted()
        for e in exits:
            log_exit(self.log, e)
            if self.injector is not None and self.injector.expects_exit(e.role, e.index):
                continue  # killed on purpose: the job goes on
            if e.returncode == 0 and e.role == "worker":
                self.finished.add(e.index)
            elif e.role == "coordinator" and not self.shutting_down:
                self.coordinator_restarts += 1
                if self.coordinator_restarts > COORDINATOR_RESTARTS:
                    raise JobFailed(f"{e.describe()}, its {self.coordinator_restarts}th unplanned death; "
                                    f"not restarting it again (see {self.logs_dir}/coordinator-{e.index}.log)")
                pid = self.launcher.start("coordinator", e.index)
                at_s = time.monotonic() - self.t_start if self.t_start is not None else 0.0
                self.log.emit("restart", member_role="coordinator", member_index=e.index, pid=pid, at_s=at_s,
                              unplanned=e.describe())
            elif e.returncode != 0 or not self.shutting_down:
                raise JobFailed(self._failure(e))

    def _failure(self, e: Exit) -> str:
        """Why the job stops for role exit ``e``: which role, how, and (a worker's
        command) the last lines of its stderr."""
        where = f"{self.logs_dir}/{e.role}-{e.index}.{'err' if self.script and e.role == 'worker' else 'log'}"
        message = f"{e.describe()}; stopping the job (see {where})"
        if self.script and e.role == "worker" and (tail := self.launcher.output_tail(e.role, e.index)):
            message += "; its stderr ended with:\n" + "\n".join(f"    {line}" for line in tail.splitlines())
        return message

    def _locate(self, position: str, shard: int) -> int | None:
        """The server process at ``position`` of ``shard``'s chain right now."""
        try:
            members = [Member(*m).index for m in self.control.call("chain", patience_s=0.0, shard=shard)["members"]]
        except CoordinatorUnavailable:
            return None  # no coordinator to say who is where: the kill is skipped, and logged
        if len(members) < (3 if position == "middle" else 1):
            return None
        return {"head": members[0], "middle": members[len(members) // 2], "tail": members[-1]}[position]

    def _status(self) -> dict | None:
        """The coordinator's view now, or None while no coordinator answers."""
        try:
            self.last_status = self.control.call("status", patience_s=0.0)
        except CoordinatorUnavailable:
            return None
        return self.last_status

    def _members(self, role: str) -> list[dict]:
        return [m for m in (self._status() or {"members": []})["members"] if m["role"] == role]

    def _control(self, op: str, timeout_s: float = STOP_TIMEOUT_S, **args) -> dict:
        """An op that must get through: retried while the coordinator is down, with the
        roles watched and the fault schedule kept (which may be what restarts it)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.control.call(op, patience_s=0.0, **args)
            except CoordinatorUnavailable:
                if time.monotonic() > deadline:
                    raise JobFailed(f"no coordinator answered {op!r} within {timeout_s:g}s") from None
                self.check(self.launcher.wait(0.05))
                self._inject(time.monotonic() - self.t_start)

    def _global_clock(self) -> int | None:
        """The slowest live worker's iteration count, from its heartbeats."""
        clocks = [m["stats"]["clock"] for m in self._members("worker")
                  if m["alive"] and (m.get("stats") or {}).get("clock") is not None]
        return min(clocks) if clocks else None

    # --- the loop ------------------------------------------------------------------------
    def run(self) -> str:
        c = self.config
        # Training starts when the first worker has initialized every shard, not at
        # process start-up; wait for that on the control plane, watching for crashes.
        processes = c.cluster.servers * c.recovery.replicas_per_shard
        while sum(bool((m["stats"] or {}).get("initialized")) for m in self._members("server")) < processes:
            self.check(self.launcher.wait(0.05))
            if len(self.finished) == c.cluster.workers:  # scripts that never trained
                break
        t_start = self.t_start = time.monotonic()
        self.log.emit("train_start")
        if self.script:
            self._record_layout()
        reason, next_eval = None, t_start
        while reason is None:
            now = time.monotonic()
            wake = min(next_eval, t_start + self.injector.next_due_s())
            if self.injector.waiting_on_clock():
                wake = min(wake, now + 0.1)
            self.check(self.launcher.wait(max(0.0, wake - now)))
            if len(self.finished) == c.cluster.workers:
                reason = "every worker finished its epochs"
                break
            self._inject(time.monotonic() - t_start)
            if time.monotonic() < next_eval:
                continue
            next_eval += c.train.eval_interval_s
            reason = self._evaluate(t_start)
        self._stop(reason, t_start)
        return "completed"

    def _record_layout(self) -> None:
        """A script's layout, as its first worker fixed it, beside the run's other records."""
        layout = self._control("layout")
        if layout["ready"]:  # else no worker brought a model: there is nothing to record
            (Path(self.logs_dir).parent / "layout.json").write_text(json.dumps(
                {k: layout.get(k) for k in ("total", "bounds", "source", "digest")}, indent=1))

    def _inject(self, elapsed_s: float) -> None:
        if not self.injector.rules:
            return
        clock = self._global_clock() if self.injector.waiting_on_clock() else None
        for role, index in self.injector.tick(elapsed_s, clock):
            if role == "server" and self.config.recovery.strategy == "none":
                raise JobFailed(f"server {index} was killed (fault injection) and recovery is 'none': "
                                f"training cannot go on; use --recovery checkpoint, chain or stateless")

    def _evaluate(self, t_start: float, final: bool = False) -> str | None:
        """One test pass of the servers' model; returns why the job should stop, if it should."""
        t = self.config.train
        if self.evaluator is None:  # a script evaluates itself (stalwart.log)
            elapsed = time.monotonic() - t_start
            if not final:
                self.progress.show(elapsed, self.watch.view(self._status() or self.last_status, elapsed))
            return f"duration of {t.duration_s:g}s reached" \
                if not final and t.duration_s is not None and elapsed >= t.duration_s else None
        try:
            result = self.evaluator.evaluate(full=final)
        except (ConnectionError, OSError, ServerError) as exc:
            elapsed = time.monotonic() - t_start
            self.log.emit("eval_skipped", elapsed_s=elapsed, reason=str(exc), **({"final": True} if final else {}))
            if not final:  # the model cannot be read, but the cluster may be: keep the view live
                self.progress.show(elapsed, self.watch.view(self._status() or self.last_status, elapsed))
            if not final and t.duration_s is not None and elapsed >= t.duration_s:
                return f"duration of {t.duration_s:g}s reached"
            return None
        elapsed = time.monotonic() - t_start
        self.log.emit("eval", elapsed_s=elapsed, **({"final": True} if final else {}), **result)
        status = {"members": []} if final else (self._status() or self.last_status)
        workers = [m for m in status["members"] if m["role"] == "worker" and m.get("alive")]
        losses = [w["stats"]["loss"] for w in workers if (w.get("stats") or {}).get("loss") is not None]
        train_loss = sum(losses) / len(losses) if losses else None
        if not final:
            self.progress.update(elapsed, result, self.watch.view(status, elapsed), train_loss)
        if self.tensorboard is not None:
            self.tensorboard.add(elapsed, result, train_loss)
        if final:
            return None
        if t.duration_s is not None and elapsed >= t.duration_s:
            return f"duration of {t.duration_s:g}s reached"
        if t.stop_at_target and result["accuracy"] >= t.target_accuracy:
            return f"target accuracy {t.target_accuracy:g} reached"
        return None

    def _stop(self, reason: str, t_start: float) -> None:
        self.log.emit("stopping", reason=reason)
        self._control("stop", reason=reason)
        workers = {("worker", w) for w in range(self.config.cluster.workers)}
        self.check(self.launcher.wait_for(workers, STOP_TIMEOUT_S))
        if workers & set(self.launcher.running()):
            raise JobFailed(f"workers did not stop within {STOP_TIMEOUT_S}s of being asked")
        self._evaluate(t_start, final=True)
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.client is not None:
            self.client.close()
        self.shutting_down = True
        self._control("shutdown", reason=reason)
        self.control.close()
        self.check(self.launcher.wait_for(set(self.launcher.running()), STOP_TIMEOUT_S))
