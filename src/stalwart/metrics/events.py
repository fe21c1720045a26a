"""The JSON-lines event log every process writes into its run directory.

One file per process (``events/<role>-<index>.jsonl``) so that writers never contend
and a SIGKILLed process loses at most its last line. Each line carries the absolute
wall time ``t``; reports turn it into seconds since the job started.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator


class EventLog:
    def __init__(self, path: str | Path | None, role: str, index: int = 0):
        self.role, self.index = role, index
        # called with each record after it is written (the driver's live display)
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._lock = threading.Lock()
        self._file = None
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1, encoding="utf-8")

    @classmethod
    def for_role(cls, run_dir: str | Path | None, role: str, index: int = 0) -> "EventLog":
        path = None if run_dir is None else Path(run_dir) / "events" / f"{role}-{index}.jsonl"
        return cls(path, role, index)

    def emit(self, event: str, **fields: Any) -> None:
        record = {"t": time.time(), "role": self.role, "index": self.index, "event": event, **fields}
        line = json.dumps(record, default=_jsonable)
        with self._lock:
            if self._file is not None:
                self._file.write(line + "\n")
        for listener in self.listeners:
            listener(record)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def read_events(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Every event of a run, in time order. A line that is not an event (a torn last
    line after a SIGKILL, or damage) is skipped: a summary is made of what survives."""
    records = []
    for path in sorted((Path(run_dir) / "events").glob("*.jsonl")):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("event"), str) \
                        and isinstance(record.get("t", 0.0), (int, float)):
                    records.append(record)
    records.sort(key=lambda r: r.get("t", 0.0))
    return iter(records)
