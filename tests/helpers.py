import json
import time
from pathlib import Path
from typing import Callable


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str):
    """Bounded wait on an observable condition (a file appearing, a process state)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def events(run_dir: Path, name: str) -> list[dict]:
    out = []
    for path in (run_dir / "events").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record["event"] == name:
                out.append(record)
    return out


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"
