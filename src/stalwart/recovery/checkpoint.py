"""Checkpoints of one shard: a cheap in-memory snapshot, persisted in the background.

The split follows CheckFreq: :meth:`Checkpointer.snapshot` runs on the update path, so
it only copies the shard and its optimizer state into preallocated buffers (a memcpy
of a few MB at most) while the server holds its state lock; a background thread then
writes the snapshot to disk while training goes on. A snapshot taken while the
previous one is still being written replaces it (the newer state wins; nothing waits).

A file is written atomically: a temporary file, ``fsync``, ``rename``, and an ``fsync``
of the folder, so a crash leaves either the old file or the new one, never half of
one. Each file holds a magic, a format version, a msgpack header (shard, size, model
version, array names, dtypes and shapes) and the raw arrays, and a SHA-256 over all of
it. :meth:`Checkpointer.load_newest` tries files from the newest; one that is truncated,
corrupted or for another shard is logged and skipped for the one before it. The last
``keep`` files are kept.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import threading
import time
from pathlib import Path

import msgpack
import numpy as np

from ..metrics import EventLog

MAGIC = b"STLWCKPT"
FORMAT = 1
_PREFIX = struct.Struct("!8sHI")  # magic, format, header length
_NAME = re.compile(r"^shard(\d+)-v(\d{12})\.ckpt$")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted; the message says why."""


def encode(shard: int, version: int, arrays: dict[str, np.ndarray], scalars: dict) -> list[bytes | memoryview]:
    header = msgpack.packb({"shard": shard, "version": version, "scalars": scalars,
                            "arrays": [[k, str(a.dtype), list(a.shape)] for k, a in arrays.items()]})
    parts: list[bytes | memoryview] = [_PREFIX.pack(MAGIC, FORMAT, len(header)), header]
    parts += [memoryview(np.ascontiguousarray(a)).cast("B") for a in arrays.values()]
    digest = hashlib.sha256()
    for p in parts:
        digest.update(p)
    return parts + [digest.digest()]


def decode(raw: bytes, shard: int | None = None) -> tuple[int, dict[str, np.ndarray], dict]:
    """Parse and verify one checkpoint file's bytes: (version, arrays, scalars)."""
    if len(raw) < _PREFIX.size + 32:
        raise CheckpointError(f"truncated: {len(raw)} bytes")
    if hashlib.sha256(raw[:-32]).digest() != raw[-32:]:
        raise CheckpointError("checksum mismatch (corrupted or truncated)")
    magic, fmt, header_len = _PREFIX.unpack_from(raw)
    if magic != MAGIC:
        raise CheckpointError("not a stalwart checkpoint (bad magic)")
    if fmt != FORMAT:
        raise CheckpointError(f"format {fmt} is not supported (expected {FORMAT})")
    try:
        header = msgpack.unpackb(raw[_PREFIX.size:_PREFIX.size + header_len])
    except Exception as exc:  # msgpack raises several unrelated types
        raise CheckpointError(f"undecodable header: {exc}") from None
    if shard is not None and header.get("shard") != shard:
        raise CheckpointError(f"holds shard {header.get('shard')}, not shard {shard}")
    offset = _PREFIX.size + header_len
    arrays = {}
    for name, dtype, shape in header["arrays"]:
        count = int(np.prod(shape))
        arr = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape)
        arrays[name] = arr
        offset += arr.nbytes
    if offset != len(raw) - 32:
        raise CheckpointError(f"array sizes disagree with the file size ({offset} vs {len(raw) - 32})")
    return int(header["version"]), arrays, header.get("scalars", {})


class Checkpointer:
    def __init__(self, folder: Path, shard: int, log: EventLog, *, every_updates: int | None,
                 every_s: float | None, keep: int = 3):
        self.folder, self.shard, self.log = Path(folder), shard, log
        self.every_updates, self.every_s, self.keep = every_updates, every_s, keep
        self.folder.mkdir(parents=True, exist_ok=True)
        self._spare: dict[str, np.ndarray] | None = None
        self._ready: tuple[int, dict, dict] | None = None   # the snapshot waiting to be written
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

    def snapshot(self, version: int, arrays: dict[str, np.ndarray], scalars: dict) -> None:
        """Copy the state into this checkpointer's buffers; the caller holds the state lock."""
        t0 = time.perf_counter()
        with self._cond:
            # Overwrite a snapshot not yet written, else reuse the buffers of the last one.
            copies = self._ready[1] if self._ready is not None else (self._spare or {})
            self._spare = None
            for k, a in arrays.items():
                if k not in copies or copies[k].shape != a.shape or copies[k].dtype != a.dtype:
                    copies[k] = np.empty_like(a)
                np.copyto(copies[k], a)
            self._ready = (version, copies, dict(scalars))
            self._cond.notify_all()
        self._last_version, self._last_time = version, time.monotonic()
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
                version, arrays, scalars = self._ready
                self._ready = None
                self._writing = True
            t0 = time.perf_counter()
            try:
                path = self._write(version, arrays, scalars)
            except OSError as exc:
                self.log.emit("checkpoint_failed", shard=self.shard, version=version, reason=str(exc))
            else:
                self.stats["persisted"] += 1
                self.stats["persist_s"] += time.perf_counter() - t0
                self.log.emit("checkpoint", shard=self.shard, version=version, path=path.name,
                              seconds=round(time.perf_counter() - t0, 4))
            with self._cond:
                self._spare = arrays  # the next snapshot copies into these
                self._writing = False
                self._cond.notify_all()

    def _write(self, version: int, arrays: dict, scalars: dict) -> Path:
        final = self.folder / f"shard{self.shard}-v{version:012d}.ckpt"
        tmp = final.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            for part in encode(self.shard, version, arrays, scalars):
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

    def load_newest(self) -> tuple[int, dict[str, np.ndarray], dict] | None:
        """The newest checkpoint that verifies, or None; bad files are logged and skipped."""
        for path in self.files():
            try:
                loaded = decode(path.read_bytes(), self.shard)
            except (CheckpointError, OSError, KeyError, TypeError, ValueError) as exc:
                self.log.emit("checkpoint_skipped", shard=self.shard, path=path.name, reason=str(exc))
                continue
            self.log.emit("checkpoint_loaded", shard=self.shard, path=path.name, version=loaded[0])
            self._last_version = loaded[0]
            return loaded
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
