"""Checkpoints of one shard: a cheap in-memory snapshot, persisted in the background.

The split follows CheckFreq: :meth:`Checkpointer.snapshot` runs on the update path, so
it only copies the shard and its optimizer state into preallocated buffers (a memcpy
of a few MB at most) while the server holds its state lock; a background thread then
writes the snapshot to disk while training goes on. A snapshot taken while the
previous one is still being written replaces it (the newer state wins; nothing waits).

A file is written atomically: a temporary file, ``fsync``, ``rename``, and an ``fsync``
of the folder, so a crash leaves either the old file or the new one, never half of
one. A file holds one encoded :class:`~stalwart.shard.Snapshot` (checksummed; the same
format a chain's state transfer uses) of the parameters and the optimizer; the sync
policy stays out, since a restored server is older than the clocks the workers bring
and follows them instead. :meth:`Checkpointer.load_newest` tries files from the newest;
one that is truncated, corrupted or for another shard is logged and skipped for the
one before it. The last ``keep`` files are kept.

:class:`CheckpointRecovery` is the strategy: a snapshot after every ``every_updates``
updates or ``every_s`` seconds, the newest good one restored when a server starts.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import numpy as np

from ..metrics import EventLog
from ..shard import ShardState, Snapshot, SnapshotError
from .base import RecoveryStrategy

_NAME = re.compile(r"^shard(\d+)-v(\d{12})\.ckpt$")


class Checkpointer:
    """The snapshot/persist split for one shard: :meth:`snapshot` copies on the update
    path into reused buffers, a background thread writes the files; :meth:`load_newest`
    reads back the newest one that verifies."""

    def __init__(self, folder: Path, shard: int, log: EventLog, *, every_updates: int | None,
                 every_s: float | None, keep: int = 3):
        self.folder, self.shard, self.log = Path(folder), shard, log
        self.every_updates, self.every_s, self.keep = every_updates, every_s, keep
        self.folder.mkdir(parents=True, exist_ok=True)
        self._spare: dict[str, np.ndarray] | None = None
        self._ready: Snapshot | None = None   # the snapshot waiting to be written
        self._cond = threading.Condition()
        self._closed = False
        self._writing = False
        self._last_version = -1
        self._last_time = time.monotonic()
        self.stats = {"snapshots": 0, "persisted": 0, "snapshot_s": 0.0, "persist_s": 0.0}
        self._thread = threading.Thread(target=self._persist_loop, name="checkpoint", daemon=True)
        self._thread.start()

    # --- on the update path ---------------------------------------------------------
    def due(self, version: int) -> bool:
        if self.every_updates is not None and version - self._last_version >= self.every_updates:
            return True
        return self.every_s is not None and time.monotonic() - self._last_time >= self.every_s

    def snapshot(self, snap: Snapshot) -> None:
        """Copy ``snap`` (views of the live state; the caller holds the shard's lock) into
        this checkpointer's buffers."""
        t0 = time.perf_counter()
        with self._cond:
            # Overwrite a snapshot not yet written, else reuse the buffers of the last one.
            copies = self._ready.arrays if self._ready is not None else (self._spare or {})
            self._spare = None
            for k, a in snap.arrays.items():
                if k not in copies or copies[k].shape != a.shape or copies[k].dtype != a.dtype:
                    copies[k] = np.empty_like(a)
                np.copyto(copies[k], a)
            self._ready = Snapshot(snap.shard, snap.version, snap.initialized, copies,
                                   {k: dict(v) for k, v in snap.scalars.items()})
            self._cond.notify_all()
        self._last_version, self._last_time = snap.version, time.monotonic()
        self.stats["snapshots"] += 1
        self.stats["snapshot_s"] += time.perf_counter() - t0

    # --- in the background ----------------------------------------------------------
    def _persist_loop(self) -> None:
        while True:
            with self._cond:
                while self._ready is None and not self._closed:
                    self._cond.wait()
                if self._ready is None:
                    return
                snap, self._ready = self._ready, None
                self._writing = True
            t0 = time.perf_counter()
            try:
                path = self._write(snap)
            except OSError as exc:
                self.log.emit("checkpoint_failed", shard=self.shard, version=snap.version, reason=str(exc))
            else:
                self.stats["persisted"] += 1
                self.stats["persist_s"] += time.perf_counter() - t0
                self.log.emit("checkpoint", shard=self.shard, version=snap.version, path=path.name,
                              seconds=round(time.perf_counter() - t0, 4))
            with self._cond:
                self._spare = snap.arrays  # the next snapshot copies into these
                self._writing = False
                self._cond.notify_all()

    def _write(self, snap: Snapshot) -> Path:
        final = self.folder / f"shard{self.shard}-v{snap.version:012d}.ckpt"
        tmp = final.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            for part in snap.encode():
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        for old in self.files()[self.keep:]:
            old.unlink(missing_ok=True)
        return final

    def files(self) -> list[Path]:
        """This shard's checkpoint files, newest first."""
        found = [(int(m[2]), p) for p in self.folder.iterdir()
                 if (m := _NAME.match(p.name)) and int(m[1]) == self.shard]
        return [p for _, p in sorted(found, reverse=True)]

    def load_newest(self) -> Snapshot | None:
        """The newest checkpoint that verifies, or None; bad files are logged and skipped."""
        for path in self.files():
            try:
                snap = Snapshot.decode(path.read_bytes(), self.shard)
            except (SnapshotError, OSError) as exc:
                self.log.emit("checkpoint_skipped", shard=self.shard, path=path.name, reason=str(exc))
                continue
            self.log.emit("checkpoint_loaded", shard=self.shard, path=path.name, version=snap.version)
            self._last_version = snap.version
            return snap
        return None

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every snapshot taken so far is on disk; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._ready is None and not self._writing, timeout_s)

    def close(self, flush: bool = True) -> None:
        with self._cond:
            self._closed = True
            if not flush:
                self._ready = None
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def watch(self, shard: ShardState) -> None:
        """Snapshot ``shard`` whenever it is due, on its update path."""
        def after_update(state: ShardState) -> None:
            if self.due(state.version):
                self.snapshot(state.snapshot(policy=False))
        shard.after_update.append(after_update)

    def prefixed_stats(self) -> dict:
        """The counters as a server reports them (``checkpoint_snapshots``, ...)."""
        return {f"checkpoint_{k}": v for k, v in self.stats.items()}


class CheckpointRecovery(RecoveryStrategy):
    """Snapshots persisted in the background; a restarted server resumes from the newest."""

    name = "checkpoint"

    def __init__(self, checkpointer: Checkpointer):
        self.checkpointer = checkpointer

    def bind(self, shard, serve, log) -> None:
        super().bind(shard, serve, log)
        self.checkpointer.watch(shard)

    def recover(self) -> None:
        snap = self.checkpointer.load_newest()
        if snap is None:
            return
        with self.shard.lock:
            self.shard.restore(snap)
        self.log.emit("restored", shard=self.shard.shard, version=snap.version)

    def close(self) -> None:
        self.checkpointer.close()

    def stats(self) -> dict:
        return self.checkpointer.prefixed_stats()
