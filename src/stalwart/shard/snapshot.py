"""One format for a shard's whole state: checkpoint files and chain state transfers.

A :class:`Snapshot` is what :meth:`~stalwart.shard.state.ShardState.snapshot` returns
and :meth:`~stalwart.shard.state.ShardState.restore` installs: the shard's version,
whether it holds parameters yet, named arrays (``params``, the optimizer's
``opt.<name>``, the sync policy's ``policy.<name>``) and plain values (``optimizer``
and ``policy`` maps). A snapshot may hold less than everything: a checkpoint leaves
the policy out (it is older than the clocks the workers bring back, see BSP), and a
stateless rebuild candidate is a worker's copy of the parameters alone; restoring
installs what it holds and leaves the rest as it is.

Encoded, it is a magic, a format number, a msgpack header (shard, version, plain
values, array names, dtypes and shapes), the raw arrays and a SHA-256 over all of it:
a file a crash cut short, a flipped bit or another shard's state is refused by name.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

import msgpack
import numpy as np

MAGIC = b"STLWSNAP"
FORMAT = 2
_PREFIX = struct.Struct("!8sHI")  # magic, format, header length
DIGEST = 32


class SnapshotError(ValueError):
    """Bytes that do not hold a trustworthy snapshot; the message says why."""


@dataclass
class Snapshot:
    shard: int
    version: int
    initialized: bool = True
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict = field(default_factory=dict)

    def section(self, prefix: str) -> dict | None:
        """The state of one part (``"opt"`` or ``"policy"``): its arrays and plain values
        together, as that part's ``load_state_dict`` takes them; None if not held."""
        name = {"opt": "optimizer"}.get(prefix, prefix)
        if name not in self.scalars:
            return None
        head = prefix + "."
        return {**self.scalars[name], **{k[len(head):]: v for k, v in self.arrays.items() if k.startswith(head)}}

    def encode(self) -> list[bytes | memoryview]:
        """The encoded parts, in order (written one by one, or joined)."""
        header = msgpack.packb({"shard": self.shard, "version": self.version, "initialized": self.initialized,
                                "scalars": self.scalars,
                                "arrays": [[k, str(a.dtype), list(a.shape)] for k, a in self.arrays.items()]})
        parts: list[bytes | memoryview] = [_PREFIX.pack(MAGIC, FORMAT, len(header)), header]
        parts += [memoryview(np.ascontiguousarray(a)).cast("B") for a in self.arrays.values()]
        digest = hashlib.sha256()
        for p in parts:
            digest.update(p)
        return parts + [digest.digest()]

    def to_bytes(self) -> bytes:
        return b"".join(self.encode())

    @classmethod
    def decode(cls, raw: bytes | memoryview, shard: int | None = None) -> "Snapshot":
        """Parse and verify encoded bytes; the arrays are views of ``raw``."""
        raw = memoryview(raw).cast("B")
        if len(raw) < _PREFIX.size + DIGEST:
            raise SnapshotError(f"truncated: {len(raw)} bytes")
        if hashlib.sha256(raw[:-DIGEST]).digest() != raw[-DIGEST:]:
            raise SnapshotError("checksum mismatch (corrupted or truncated)")
        magic, fmt, header_len = _PREFIX.unpack_from(raw)
        if magic != MAGIC:
            raise SnapshotError("not a stalwart snapshot (bad magic)")
        if fmt != FORMAT:
            raise SnapshotError(f"format {fmt} is not supported (expected {FORMAT})")
        try:
            # Integer keys are the policies' own (worker ids); the checksum vouches for them.
            header = msgpack.unpackb(raw[_PREFIX.size:_PREFIX.size + header_len], strict_map_key=False)
            if shard is not None and header.get("shard") != shard:
                raise SnapshotError(f"holds shard {header.get('shard')}, not shard {shard}")
            offset = _PREFIX.size + header_len
            arrays = {}
            for name, dtype, shape in header["arrays"]:
                arr = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
                arrays[name] = arr
                offset += arr.nbytes
            if offset != len(raw) - DIGEST:
                raise SnapshotError(f"array sizes disagree with the size ({offset} vs {len(raw) - DIGEST})")
            return cls(int(header["shard"]), int(header["version"]), bool(header["initialized"]), arrays,
                       dict(header["scalars"]))
        except SnapshotError:
            raise
        except Exception as exc:  # msgpack, numpy and a malformed header raise many unrelated types
            raise SnapshotError(f"undecodable header: {exc}") from None
