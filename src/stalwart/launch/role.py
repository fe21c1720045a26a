"""Entry point of every role process: ``python -m stalwart.launch.role ROLE INDEX SPEC``."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m stalwart.launch.role coordinator|server|worker INDEX SPEC", file=sys.stderr)
        return 2
    role, index, spec_path = argv[0], int(argv[1]), argv[2]
    from ..spec import RoleSpec
    spec = RoleSpec.load(spec_path)
    if role == "coordinator":
        from ..control.main import run_coordinator
        return run_coordinator(spec, index)
    if role == "server":
        from ..server.main import run_server
        return run_server(spec, index)
    if role == "worker":
        from ..worker.main import run_worker
        return run_worker(spec, index)
    print(f"unknown role {role!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
