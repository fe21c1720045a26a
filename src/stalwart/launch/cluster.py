"""Start a job's coordinator and servers as processes, and connect to them.

Shared by :class:`~stalwart.launch.job.Job` (which adds workers), the benchmarks and
the tests, so that each of them runs the very processes a real job runs.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import JobConfig
from ..control import CoordinatorClient, CoordinatorError, CoordinatorUnavailable
from .base import Exit, Launcher
from .local import LocalLauncher
from ..spec import TOKEN_ENV, RoleSpec, job_token


class ClusterError(RuntimeError):
    """A role failed while the cluster was starting or running."""


def make_launcher(config: JobConfig, run_dir: Path, env: dict[str, str],
                  placement: dict[str, dict] | None = None) -> Launcher:
    """The launcher ``cluster.launcher`` names."""
    if config.cluster.launcher == "ray":
        if placement:
            raise ClusterError("netlab places roles in network namespaces of this host: it runs with the "
                               "local launcher, not Ray")
        from .ray import RayLaunchError, RayLauncher
        try:
            return RayLauncher(run_dir, env, config)
        except RayLaunchError as exc:
            raise ClusterError(str(exc)) from None
    return LocalLauncher(run_dir, env, placement)


@dataclass
class Cluster:
    launcher: Launcher
    spec: RoleSpec
    token: bytes

    @classmethod
    def start(cls, config: JobConfig, run_dir: Path, bounds: list[int],
              input_shape: tuple[int, ...] = (1,), num_classes: int = 10,
              placement: dict[str, dict] | None = None) -> "Cluster":
        """Coordinator first (its socket bound before it starts, so its address is known), then servers."""
        if config.control.store != "memory":  # before any process: a typo'd endpoint is one line
            from ..control.store import EtcdStore, StoreError
            try:
                EtcdStore(config.control.store, "check").check()
            except StoreError as exc:
                raise ClusterError(f"control store: {exc}") from None
        try:  # a token the user chose (to join workers later), else a fresh one
            token = job_token(required=False) or secrets.token_bytes(32)
        except ValueError as exc:
            raise ClusterError(str(exc)) from None
        launcher = make_launcher(config, Path(run_dir), {TOKEN_ENV: token.hex()}, placement)
        try:
            coordinators = range(config.control.coordinators)
            addresses = ",".join(launcher.bind_coordinator(config.cluster.host, c) for c in coordinators)
            spec = RoleSpec(config=config.model_dump(mode="json"), run_dir=str(Path(run_dir).resolve()),
                            coordinator=addresses, bounds=list(bounds), input_shape=list(input_shape),
                            num_classes=num_classes, placement=placement or {}, job_id=secrets.token_hex(8),
                            workdir=os.getcwd())
            spec_path = Path(run_dir) / "spec.json"
            spec.save(spec_path)
            launcher.use_spec(spec, spec_path)
            for c in coordinators:
                launcher.start("coordinator", c)
            for s in range(config.cluster.servers * config.recovery.replicas_per_shard):
                launcher.start("server", s)
        except BaseException:
            launcher.shutdown(grace_s=1.0)
            raise
        return cls(launcher, spec, token)

    def connect(self, role: str, check: Callable[[list[Exit]], None] | None = None,
                timeout_s: float = 120.0, shard_map: bool = True) -> tuple[CoordinatorClient, list[str] | None]:
        """Register with the coordinator as ``role`` and wait for the complete shard map
        (unless ``shard_map`` is false: a script's servers wait for its first worker),
        failing fast if a role process dies meanwhile."""
        check = check or self.fail_on_exit
        deadline = time.monotonic() + timeout_s
        # No patience: a caller that waits here must also see a role die meanwhile.
        control = CoordinatorClient(self.spec.coordinator, self.token, role, 0, patience_s=0.0)
        while True:
            check(self.launcher.wait(0.05))
            try:
                control.register()
                break
            except CoordinatorUnavailable:
                if time.monotonic() > deadline:
                    raise ClusterError(f"the coordinator did not answer within {timeout_s}s") from None
        if not shard_map:
            return control, None
        while True:
            check(self.launcher.wait(0.0))
            reply = control.call("shard_map", wait_s=0.5)
            if reply["ready"]:
                control.tails = reply["tails"]
                return control, reply["shards"]
            if time.monotonic() > deadline:
                raise ClusterError(f"not every server registered within {timeout_s}s")

    @staticmethod
    def fail_on_exit(exits: list[Exit]) -> None:
        for e in exits:
            raise ClusterError(e.describe())

    def stop(self, control: CoordinatorClient | None = None) -> list[Exit]:
        if control is not None:
            try:
                control.call("shutdown", reason="done")
            except CoordinatorError:
                pass
            control.close()
            self.launcher.wait_for(set(self.launcher.running()), 10.0)
        return self.launcher.shutdown(grace_s=5.0)
