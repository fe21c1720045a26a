"""Job configuration: one pydantic model, from YAML, flags or Python, validated up front.

A bad value fails before any process starts, with one line naming the field:
``config error: optimizer.lr: Input should be greater than 0``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from .metrics.cost import CostRates
from .recovery.chain import ChainMode
from .recovery.stateless import FlushRule
from .transport.ltp.config import LtpConfig


def _one_of(value: str, known, what: str) -> str:
    if value not in known:
        raise ValueError(f"unknown {what} {value!r}; choose one of {sorted(known)}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClusterConfig(_Section):
    workers: int = Field(4, ge=1, le=1024)
    # The most workers the job may have at once, workers that join a running job included
    # (`stalwart run --join`); None: twice `workers`.
    max_workers: int | None = Field(None, ge=1, le=2048)
    servers: int = Field(2, ge=1, le=256)
    # Loopback unless told otherwise: a server is reachable only from this host by default.
    host: str = "127.0.0.1"
    transport: str = "tcp"
    # TCP between a worker and a server on one host moves large payloads through shared
    # memory (both ends detect it); false keeps every byte on the socket.
    shm: bool = True
    # Where the roles run: processes on this host, or Ray actors across a Ray cluster.
    launcher: Literal["local", "ray"] = "local"
    # The Ray cluster: "auto" (the one this host belongs to), "HOST:PORT", or "local" (a
    # private instance started for this job and stopped after it).
    ray_address: str = "auto"
    # CPUs Ray reserves for each role's actor (a hint for placement, not a limit).
    ray_cpus_per_role: float = Field(0.1, gt=0, le=64)
    heartbeat_s: float = Field(0.2, gt=0, le=10)
    lease_s: float = Field(2.0, gt=0, le=120)

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> "ClusterConfig":
        if self.lease_s <= 2 * self.heartbeat_s:
            raise ValueError(f"lease_s ({self.lease_s}) must exceed two heartbeats "
                             f"({2 * self.heartbeat_s}) or healthy members would expire")
        return self

    @model_validator(mode="after")
    def _room_for_the_workers(self) -> "ClusterConfig":
        if self.max_workers is not None and self.max_workers < self.workers:
            raise ValueError(f"max_workers ({self.max_workers}) is below workers ({self.workers})")
        return self

    @property
    def worker_slots(self) -> int:
        """Worker indices the job has room for: those it starts, and joiners."""
        return self.max_workers if self.max_workers is not None else 2 * self.workers

    @field_validator("transport")
    @classmethod
    def _known_transport(cls, value: str) -> str:
        from .transport import TRANSPORTS
        return _one_of(value, TRANSPORTS, "transport")


class DataConfig(_Section):
    dataset: str = "mnist1d"
    data_dir: Path | None = None
    # MNIST-1D: samples generated; synthetic: samples drawn. None means the data set's default.
    samples: int | None = Field(None, ge=20)
    features: int = Field(256, ge=1, description="input size of the synthetic data set")
    batch_size: int = Field(32, ge=1, le=65536)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        from .data.datasets import DATASETS
        return _one_of(value, DATASETS, "dataset")


class ModelConfig(_Section):
    # A built-in name or a user factory as "package.module:factory".
    name: str = "cnn1d"
    hidden: int = Field(256, ge=1)

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from .models import BUILTIN
        # A user factory "package.module:function" is checked when it is imported.
        return value if ":" in value else _one_of(value, BUILTIN, "model")


class OptimizerConfig(_Section):
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"betas {value} must each lie in [0, 1)")
        return value


class SyncConfig(_Section):
    # "bsp" or "asp"; parsed and checked by stalwart.sync.parse_policy.
    policy: str = "bsp"

    @field_validator("policy")
    @classmethod
    def _parses(cls, value: str) -> str:
        from .sync import parse_policy
        parse_policy(value)
        return value


class TrainConfig(_Section):
    # None with no epochs either: 30 s for built-in workers; a script runs until it ends.
    duration_s: float | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    target_accuracy: float | None = Field(0.9, gt=0, le=1)
    stop_at_target: bool = False
    eval_interval_s: float = Field(1.0, gt=0, description="seconds between the evaluator's test passes")
    # Test examples each periodic pass scores (a fixed seeded draw; None: all of them).
    # The final pass always scores the whole test set.
    eval_subset: int | None = Field(None, ge=1, le=10_000_000)
    seed: int = 0
    log_every: int = Field(10, ge=1, description="worker iterations between loss events")
    # Where a built-in worker computes: cpu, cuda, or auto (cuda where there is one).
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    # Buffers (BatchNorm's running statistics): averaged across the workers by shard 0's
    # server every buffer_every steps, or kept local to each worker.
    buffers: Literal["average", "local"] = "average"
    buffer_every: int = Field(20, ge=1, le=1_000_000, description="steps between buffer averagings")
    # Push gradient buckets while backward still runs (stalwart.worker.overlap); off: push
    # the whole gradient after backward. Buckets hold at most bucket_mb megabytes. Off by
    # default: with every core busy computing (2 cores, 4 workers) overlap measured slower
    # (docs/benchmarks.md); it pays where a core or a device is idle during backward.
    overlap: bool = False
    bucket_mb: float = Field(25.0, gt=0, le=4096, description="largest gradient bucket pushed during backward, MB")

    @model_validator(mode="after")
    def _has_a_stopping_rule(self) -> "TrainConfig":
        if self.stop_at_target and self.target_accuracy is None:
            raise ValueError("stop_at_target needs target_accuracy")
        return self


class FaultsConfig(_Section):
    # Straggler rules such as "3:2.0" or "*:jitter=0.5"; see stalwart.faults.stragglers.
    stragglers: list[str] = []
    # Kill rules such as "server:0@30s" or "worker:1@clock=200"; see stalwart.faults.kills.
    kills: list[str] = []
    # How long a killed role stays down before it is restarted; None: it stays dead.
    down_s: float | None = Field(None, ge=0)

    @field_validator("stragglers", "kills")
    @classmethod
    def _rules_parse(cls, value: list[str], info: ValidationInfo) -> list[str]:
        from .faults import parse_kill, parse_straggler
        parse = parse_straggler if info.field_name == "stragglers" else parse_kill
        for spec in value:
            parse(spec)
        return value


class RecoveryConfig(_Section):
    # none: a dead server ends the job. checkpoint: servers snapshot and persist their
    # shard; a restarted server resumes from the newest valid checkpoint. chain: each
    # shard is a chain of `replicas` servers (see stalwart.recovery.chain). stateless:
    # workers train through the outage and rebuild the server (stalwart.recovery.stateless).
    strategy: Literal["none", "checkpoint", "chain", "stateless"] = "none"
    replicas: int = Field(2, ge=1, le=16, description="chain: servers per shard")
    mode: ChainMode = Field(ChainMode.STRONG, description="chain: ack at the tail, or send state every every_updates")
    every_updates: int | None = Field(200, ge=1, description="snapshot (or relaxed chain state) after this many updates")
    every_s: float | None = Field(None, gt=0, description="...or after this many seconds")
    keep: int = Field(3, ge=1, le=100, description="checkpoint files kept per shard")
    dir: Path | None = Field(None, description="default: <run dir>/checkpoints")
    reconnect_s: float = Field(60.0, gt=0, le=3600, description="how long workers wait for a server")
    backlog_max: int = Field(1000, ge=1, description="stateless: local steps a worker may owe a shard")
    when_full: Literal["wait", "drop"] = Field(
        "wait", description="stateless, backlog full: wait for the server, or train on without owing more")
    flush_rule: FlushRule = Field(
        FlushRule.MEAN, description="stateless: how a backlog is applied (see stalwart.recovery.stateless.flush_scale)")
    flush_clip: float = Field(1.0, gt=0, description="stateless, clip rule: largest L2 norm of a flushed change")
    outer_lr: float = Field(0.7, gt=0, le=10, description="stateless, outer rule: the outer SGD's learning rate")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="stateless, outer rule: its Nesterov momentum")
    flush_max_ratio: float = Field(10.0, gt=0, description="stateless: refuse a flushed change whose L2 norm "
                                                             "exceeds this many times the shard's")
    rebuild_window_s: float = Field(1.0, gt=0, le=60, description="stateless: how long a fresh server collects copies")
    snapshot: bool = Field(False, description="stateless: also snapshot to disk, a rebuild candidate if newer")

    @model_validator(mode="after")
    def _has_a_trigger(self) -> "RecoveryConfig":
        snapshots = self.strategy == "checkpoint" or (self.strategy == "stateless" and self.snapshot)
        if snapshots and self.every_updates is None and self.every_s is None:
            raise ValueError(f"{self.strategy} recovery with snapshots needs every_updates or every_s")
        if self.strategy == "chain" and self.replicas < 2:
            raise ValueError(f"chain replication needs replicas >= 2, got {self.replicas}")
        if self.strategy == "chain" and self.mode == ChainMode.RELAXED and self.every_updates is None:
            raise ValueError("relaxed chain replication needs every_updates")
        return self

    @property
    def replicas_per_shard(self) -> int:
        return self.replicas if self.strategy == "chain" else 1


class ControlConfig(_Section):
    """The control plane: where the coordinator's state outlives it (see stalwart.control.store)."""
    # "memory": one coordinator, rebuilt from the roles' rejoins after a restart;
    # "etcd://HOST:PORT": state and leadership in etcd, with standbys ready to take over.
    store: str = "memory"
    # Extra coordinator processes that wait to take over (etcd only); None: 1 with etcd.
    standbys: int | None = Field(None, ge=0, le=4)
    # How long roles train on without reaching any coordinator before they give up.
    patience_s: float = Field(120.0, gt=0, le=3600)

    @field_validator("store")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if value == "memory":
            return value
        host, _, port = value.removeprefix("etcd://").rpartition(":")
        if not value.startswith("etcd://") or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r}: expected memory or etcd://HOST:PORT")
        return value

    @model_validator(mode="after")
    def _standbys_need_a_shared_store(self) -> "ControlConfig":
        if self.store == "memory" and self.standbys:
            raise ValueError("standby coordinators need a store they share: use store etcd://HOST:PORT")
        return self

    @property
    def coordinators(self) -> int:
        """Coordinator processes: the leader and its standbys."""
        return 1 + (self.standbys if self.standbys is not None else int(self.store != "memory"))


class JobConfig(_Section):
    # The worker command of `stalwart run` (a user's script, run once per worker); empty:
    # the built-in workers train model on data.
    command: list[str] = []
    cluster: ClusterConfig = ClusterConfig()
    control: ControlConfig = ControlConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    sync: SyncConfig = SyncConfig()
    train: TrainConfig = TrainConfig()
    faults: FaultsConfig = FaultsConfig()
    recovery: RecoveryConfig = RecoveryConfig()
    ltp: LtpConfig = LtpConfig()
    cost: CostRates = CostRates()
    out: Path = Path("runs")
    name: str | None = None
    tensorboard: Path | None = None
    progress: bool = True

    @field_validator("name")
    @classmethod
    def _one_folder(cls, value: str | None) -> str | None:
        # the run directory is out/name: a name with a separator would put it elsewhere
        if value is not None and (not value.strip() or "/" in value or "\\" in value or value in (".", "..")):
            raise ValueError(f"run name {value!r} must be a plain folder name (no '/', not '.' or '..')")
        return value

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> "JobConfig":
        """From an optional YAML file, then dotted overrides (``{"optimizer.lr": 0.1}``)."""
        data: dict[str, Any] = {}
        if path is not None:
            try:
                loaded = yaml.safe_load(Path(path).read_text())
            except FileNotFoundError:
                raise ConfigError(f"config file {path} does not exist") from None
            except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
                raise ConfigError(f"config file {path} cannot be read: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from None
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
                raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
            if loaded is not None and not isinstance(loaded, dict):
                raise ConfigError(f"config file {path} must hold a mapping at the top level")
            data = loaded or {}
        for dotted, value in (overrides or {}).items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return cls.validate_dict(data)

    @model_validator(mode="after")
    def _has_a_stopping_rule(self) -> "JobConfig":
        if not self.command and self.train.duration_s is None and self.train.epochs is None:
            self.train.duration_s = 30.0
        if self.command and self.train.stop_at_target:
            raise ValueError("stop_at_target needs the built-in evaluator; a script decides when it stops")
        return self

    @model_validator(mode="after")
    def _faults_name_real_roles(self) -> "JobConfig":
        from .faults import parse_kill, parse_straggler
        for spec in self.faults.stragglers:
            worker = parse_straggler(spec).worker
            if worker is not None and worker >= self.cluster.workers:
                raise ValueError(f"straggler {spec!r} names worker {worker}, but the job has "
                                 f"{self.cluster.workers} workers (0..{self.cluster.workers - 1})")
        if self.recovery.strategy == "stateless" and self.sync.policy.startswith("elastic"):
            raise ValueError("stateless recovery is not supported under ElasticBSP (workers that go local "
                             "and come back are not in the barrier plan); use checkpoint or chain")
        for spec in self.faults.kills:
            rule = parse_kill(spec)
            count = {"worker": self.cluster.workers, "coordinator": self.control.coordinators,
                     "server": self.cluster.servers * self.recovery.replicas_per_shard}.get(rule.role,
                                                                                          self.cluster.servers)
            if rule.role in ("head", "middle", "tail") and self.recovery.strategy != "chain":
                raise ValueError(f"kill {spec!r}: chain positions need --recovery chain")
            if rule.role == "middle" and self.recovery.replicas < 3:
                raise ValueError(f"kill {spec!r}: a chain of {self.recovery.replicas} has no middle")
            if rule.index >= count:
                raise ValueError(f"kill {spec!r} names {rule.role} {rule.index}, but the job has "
                                 f"{count} {rule.role}s (0..{count - 1})")
            restarts = rule.down_s is not None or self.faults.down_s is not None
            if rule.role == "coordinator" and not restarts and self.control.coordinators == 1:
                raise ValueError(f"kill {spec!r}: the only coordinator must come back (add ,down=2s, or run "
                                 f"standbys with control.store etcd://HOST:PORT): the job cannot stop without one")
            if rule.role == "worker" and restarts and self.sync.policy.startswith("elastic"):
                raise ValueError(f"kill {spec!r}: restarting a worker is not supported under ElasticBSP "
                                 f"(a rejoining worker is not in the barrier plan); kill it without a restart")
        return self

    @classmethod
    def validate_dict(cls, data: dict[str, Any]) -> "JobConfig":
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError.from_validation(exc) from None

    def dump_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class ConfigError(ValueError):
    """A configuration that makes no sense; the message names the field."""

    @classmethod
    def from_validation(cls, exc: ValidationError) -> "ConfigError":
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "config"
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {msg}")
        return cls("; ".join(lines))
