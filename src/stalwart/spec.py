"""What every role process is told at start: the job's config and where things are.

The spec is a JSON file in the run directory; the job token is not in it (it travels
in the environment, ``STALWART_TOKEN``, so that it never lands on disk or in ``ps``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import JobConfig

TOKEN_ENV = "STALWART_TOKEN"
LISTEN_FD_ENV = "STALWART_LISTEN_FD"
HOST_ENV = "STALWART_HOST"  # the address a placed role binds to (see RoleSpec.placement)
SPEC_ENV = "STALWART_SPEC"      # a script's worker process: the path of its job's spec
WORKER_ENV = "STALWART_WORKER"  # ...and its worker index


@dataclass
class RoleSpec:
    config: dict
    run_dir: str
    coordinator: str          # host:port[,host:port...]: the leader and its standbys
    bounds: list[int]
    input_shape: list[int]
    num_classes: int
    # "server:0" -> {"netns": ..., "host": ...}: where a launcher runs a role (netlab);
    # a role not named here runs where the launcher does, on cluster.host.
    placement: dict = field(default_factory=dict)
    job_id: str = ""          # names this job's keys in a shared control store (etcd)
    workdir: str = ""         # where a worker command runs (the folder `stalwart run` ran in)

    @property
    def job(self) -> JobConfig:
        return JobConfig.validate_dict(self.config)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "RoleSpec":
        return cls(**json.loads(Path(path).read_text()))


def worker_env(spec_path: str | Path, index: int, token: bytes | None = None) -> dict[str, str]:
    """What a script's worker process finds its job by: the spec, its index (and the token)."""
    env = {SPEC_ENV: str(Path(spec_path).resolve()), WORKER_ENV: str(index)}
    return {**env, TOKEN_ENV: token.hex()} if token is not None else env


def job_token(required: bool = True) -> bytes | None:
    """The job token the environment holds, checked; None if it holds none (and none is
    ``required``). A user sets it to share one job between commands (``--join``)."""
    value = os.environ.get(TOKEN_ENV)
    if not value:
        if required:
            raise ValueError(f"{TOKEN_ENV} is not set: joining a job needs its token (set {TOKEN_ENV} to the "
                             f"same hex string for the job and for the worker that joins it)")
        return None
    try:
        token = bytes.fromhex(value)
    except ValueError:
        raise ValueError(f"{TOKEN_ENV} must be a hex string, e.g. from `openssl rand -hex 32`") from None
    if len(token) < 16:
        raise ValueError(f"{TOKEN_ENV} holds {len(token)} bytes; a job token needs at least 16 (32 hex digits)")
    return token


def token_from_env() -> bytes:
    value = os.environ.get(TOKEN_ENV)
    if not value:
        raise SystemExit(f"{TOKEN_ENV} is not set: a role cannot join a job without its token")
    return bytes.fromhex(value)
