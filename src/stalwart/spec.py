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


def token_from_env() -> bytes:
    value = os.environ.get(TOKEN_ENV)
    if not value:
        raise SystemExit(f"{TOKEN_ENV} is not set: a role cannot join a job without its token")
    return bytes.fromhex(value)
