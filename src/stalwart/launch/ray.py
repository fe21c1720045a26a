"""Roles placed across a Ray cluster: Ray places and supervises, the data plane stays ours.

Each role gets a Ray actor, a :class:`RoleHost`, on the node Ray picks for it. The actor
does not run the role in its own process: it runs a :class:`LocalLauncher` of one role
on its node, which starts the very ``python -m stalwart.launch.role`` process a local job
starts (a session of its own, PDEATHSIG tied to the actor, pidfd, wait4). So:

* a fault is a real SIGKILL of the role's process, and the role that restarts after it
  starts on the same actor, hence on the same node (where its checkpoints are);
* the role's signal handling, stack dumps and exit status are those of a local job;
* workers, servers and the coordinator talk over stalwart's own transports (TCP, shared
  memory between roles Ray put on one node, LTP), never through Ray's object store.

Placement. The replicas of one shard's chain go to one placement group with a bundle per
replica and the SPREAD strategy: on several nodes they land on different ones, on one
node they still run. Workers and coordinators (a leader and its etcd standbys) are spread too.

Addresses. With ``cluster.host`` on loopback (the default) every role binds to loopback,
which is right on one node and refused on several (roles on other nodes could not reach
it). With a wildcard host (``0.0.0.0``) each role binds to its own node's address, which
is what it advertises; every connection still proves the job's token.

The run directory. Roles write their events and logs under the run directory on their
own node; at shutdown the files of roles on other nodes are fetched back through their
actors, so the driver's run directory is complete with or without a shared file system.
"""

from __future__ import annotations

import ipaddress
import signal
import time
from dataclasses import asdict
from pathlib import Path

from ..config import JobConfig
from .base import Exit, Launcher, RoleKey
from .local import LocalLauncher
from ..spec import HOST_ENV, RoleSpec

WILDCARD_HOSTS = ("0.0.0.0", "::", "")
PLACEMENT_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 30.0


class RayLaunchError(RuntimeError):
    """Ray is missing, unreachable, or cannot place the job as configured."""


def _import_ray():
    try:
        import ray
    except ImportError:
        raise RayLaunchError("the ray launcher needs Ray: pip install 'stalwart[ray]'") from None
    return ray


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class RoleHost:
    """One role's supervisor on its node (the body of a Ray actor; see the module docstring)."""

    def __init__(self, run_dir: str, env: dict[str, str], host: str):
        import ray
        self.node_id = ray.get_runtime_context().get_node_id()
        self.host = ray.util.get_node_ip_address() if host in WILDCARD_HOSTS else host
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.local = LocalLauncher(self.run_dir, {**env, HOST_ENV: self.host})
        self.key: RoleKey | None = None

    def node(self) -> str:
        return self.node_id

    def bind_coordinator(self, index: int = 0) -> str:
        return self.local.bind_coordinator(self.host, index)

    def start(self, role: str, index: int, spec: dict, incarnation: int = 1) -> int:
        role_spec, path = RoleSpec(**spec), self.run_dir / "spec.json"
        if not path.exists():  # another node's copy; on the driver's node it is already there
            role_spec.save(path)
        self.local.use_spec(role_spec, path)
        self.key = (role, index)
        # The driver counts starts, not this actor: a replacement actor (its node died)
        # must not tell a coordinator it is the first, or its epochs would repeat.
        self.local.starts[(role, index)] = incarnation - 1
        return self.local.start(role, index)

    def wait_exit(self) -> Exit:
        """Block until the role's process ends (a Ray call that resolves at its exit)."""
        while True:
            if exits := self.local.wait(1.0):
                return exits[0]

    def kill(self, sig: int) -> None:
        if self.key is not None:
            self.local.kill(*self.key, sig=sig)

    def files(self) -> dict[str, bytes]:
        """This role's events and log, to bring back to a driver on another node."""
        role, index = self.key
        out = {}
        for rel in (f"events/{role}-{index}.jsonl", f"logs/{role}-{index}.log", f"logs/{role}-{index}.err"):
            path = self.run_dir / rel
            if path.exists():
                out[rel] = path.read_bytes()
        return out

    def output_tail(self, lines: int) -> str | None:
        return self.local.output_tail(*self.key, lines=lines) if self.key is not None else None

    def release(self) -> None:
        self.local.release()


class RayLauncher(Launcher):
    def __init__(self, run_dir: Path, env: dict[str, str], config: JobConfig):
        ray = self.ray = _import_ray()
        c = config.cluster
        self.run_dir, self.env, self.host = Path(run_dir), env, c.host
        self.cpus = c.ray_cpus_per_role
        self.replicas = config.recovery.replicas_per_shard
        self.owns_connection = not ray.is_initialized()
        if self.owns_connection:
            try:
                if c.ray_address == "local":
                    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
                else:
                    ray.init(address=c.ray_address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise RayLaunchError(f"could not reach the Ray cluster at {c.ray_address!r} ({exc}); start "
                                     f"one with `ray start --head`, or use --ray-address local") from None
        self.driver_node = ray.get_runtime_context().get_node_id()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if len(nodes) > 1 and _is_loopback(self.host):
            if self.owns_connection:
                ray.shutdown()
            raise RayLaunchError(f"the Ray cluster has {len(nodes)} nodes, and roles bound to {self.host} "
                                 f"could not reach each other across them: set cluster.host to 0.0.0.0 "
                                 f"(--host 0.0.0.0), and each role binds to its own node's address")
        self._actor_class = ray.remote(RoleHost)
        self.hosts: dict[RoleKey, object] = {}
        self.nodes: dict[RoleKey, str] = {}
        self.exits: dict[object, RoleKey] = {}  # a pending wait_exit call -> its role
        self.groups: dict[int, object] = {}     # shard -> the placement group of its replicas
        self.starts: dict[RoleKey, int] = {}    # each role's starts: its incarnation
        self.spec: dict | None = None

    # --- placement ------------------------------------------------------------------
    def _strategy(self, role: str, index: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        if role == "server" and self.replicas > 1:
            shard = index // self.replicas
            if shard not in self.groups:
                from ray.util.placement_group import placement_group
                group = placement_group([{"CPU": self.cpus}] * self.replicas, strategy="SPREAD")
                ready, _ = self.ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
                if not ready:
                    raise RayLaunchError(f"Ray could not place the {self.replicas} replicas of shard {shard} "
                                         f"within {PLACEMENT_TIMEOUT_S:g}s ({self.cpus} CPU each)")
                self.groups[shard] = group
            return PlacementGroupSchedulingStrategy(self.groups[shard], placement_group_bundle_index=index % self.replicas)
        # Coordinators spread too: an etcd standby on another node survives its leader's node.
        return "SPREAD" if role in ("worker", "coordinator") else "DEFAULT"

    def _host(self, role: str, index: int):
        key = (role, index)
        if key not in self.hosts:
            # A threaded actor: wait_exit blocks while kill must get through. PDEATHSIG
            # follows the thread that started the role; Ray keeps an actor's threads for
            # its life (the tests' roles outlive the call that started them by far).
            actor = self._actor_class.options(
                num_cpus=self.cpus, max_concurrency=4,
                scheduling_strategy=self._strategy(role, index),
            ).remote(str(self.run_dir), self.env, self.host)
            self.nodes[key] = self._call(actor.node, what=f"placing {role} {index}")
            self.hosts[key] = actor
        return self.hosts[key]

    def _call(self, method, *args, what: str):
        try:
            return self.ray.get(method.remote(*args), timeout=CALL_TIMEOUT_S)
        except self.ray.exceptions.GetTimeoutError:
            raise RayLaunchError(f"{what}: no answer from Ray within {CALL_TIMEOUT_S:g}s") from None

    def describe(self) -> dict:
        return {"launcher": "ray", "driver_node": self.driver_node,
                "nodes": {f"{role}:{index}": node for (role, index), node in self.nodes.items()}}

    # --- the Launcher interface ------------------------------------------------------------
    def bind_coordinator(self, host: str, index: int = 0) -> str:
        actor = self._host("coordinator", index)
        return self._call(actor.bind_coordinator, index, what="binding the coordinator's socket")

    def use_spec(self, spec: RoleSpec, path: Path) -> None:
        self.spec = asdict(spec)

    def start(self, role: str, index: int) -> int:
        actor = self._host(role, index)
        self.starts[(role, index)] = self.starts.get((role, index), 0) + 1
        pid = self._call(actor.start, role, index, self.spec, self.starts[(role, index)],
                         what=f"starting {role} {index}")
        self.exits[actor.wait_exit.remote()] = (role, index)
        return pid

    def wait(self, timeout_s: float) -> list[Exit]:
        if not self.exits:
            time.sleep(max(0.0, timeout_s))  # nothing runs, so nothing can end
            return []
        pending = list(self.exits)
        ready, _ = self.ray.wait(pending, num_returns=1, timeout=max(0.0, timeout_s))
        if ready:
            ready, _ = self.ray.wait(pending, num_returns=len(pending), timeout=0)
        exits = []
        for ref in ready:
            role, index = self.exits.pop(ref)
            try:
                exits.append(self.ray.get(ref))
            except self.ray.exceptions.RayActorError:
                # The actor itself is gone (its node died, or Ray killed it): so is the role.
                self.hosts.pop((role, index), None)
                exits.append(Exit(role, index, -1, -signal.SIGKILL))
        return exits

    def running(self) -> list[RoleKey]:
        return list(self.exits.values())

    def kill(self, role: str, index: int, sig: int = signal.SIGKILL) -> None:
        if (role, index) in self.running():
            try:
                self._call(self.hosts[(role, index)].kill, sig, what=f"signalling {role} {index}")
            except self.ray.exceptions.RayActorError:
                pass  # gone already; wait() reports it

    def output_tail(self, role: str, index: int, lines: int = 12) -> str | None:
        host = self.hosts.get((role, index))
        if host is None:
            return None
        try:
            return self._call(host.output_tail, lines, what=f"reading {role} {index}'s output")
        except (self.ray.exceptions.RayError, RayLaunchError):
            return None  # its actor is gone with its node: the run directory has what came back

    def release(self) -> None:
        ray = self.ray
        for key, actor in list(self.hosts.items()):
            try:
                if self.nodes.get(key) != self.driver_node:
                    for rel, data in self._call(actor.files, what="fetching a role's files").items():
                        (self.run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                        (self.run_dir / rel).write_bytes(data)
                self._call(actor.release, what="releasing a role's socket")
            except (ray.exceptions.RayError, RayLaunchError, OSError):
                pass  # a dead actor has nothing to give back
            ray.kill(actor)
        self.hosts.clear()
        from ray.util.placement_group import remove_placement_group
        for group in self.groups.values():
            remove_placement_group(group)
        self.groups.clear()
        if self.owns_connection and ray.is_initialized():
            ray.shutdown()
