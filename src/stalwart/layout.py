"""Where every parameter lives: one flat float32 vector, cut into contiguous shards.

Parameters are laid end to end in registration order; shard ``s`` of ``S`` is the range
``[bounds[s], bounds[s+1])`` of that vector, cut evenly (on 16-element boundaries, so
every shard starts cache-line aligned) rather than at tensor boundaries: the server
optimizers are elementwise, so a tensor split across two shards is updated exactly as
if it were whole, and the load on the servers is balanced to the element.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Iterable

ALIGN = 16


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return prod(self.shape)


class ParameterLayout:
    def __init__(self, named_shapes: Iterable[tuple[str, tuple[int, ...]]]):
        self.entries: list[Entry] = []
        offset = 0
        for name, shape in named_shapes:
            entry = Entry(name, tuple(int(d) for d in shape), offset)
            self.entries.append(entry)
            offset += entry.numel
        self.total = offset

    @classmethod
    def from_module(cls, module) -> "ParameterLayout":
        # Frozen parameters (requires_grad False) are not trained, so not laid out.
        return cls((name, tuple(p.shape)) for name, p in module.named_parameters() if p.requires_grad)

    def shard_bounds(self, shards: int) -> list[int]:
        """``shards + 1`` offsets; shard ``s`` owns ``[bounds[s], bounds[s+1])``."""
        if shards < 1:
            raise ValueError("need at least one shard")
        if self.total < shards:
            raise ValueError(f"{shards} shards for a model of {self.total} parameters: "
                             f"some shards would be empty")
        bounds = [0]
        for s in range(1, shards):
            cut = (self.total * s // shards) // ALIGN * ALIGN
            bounds.append(cut if cut > bounds[-1] else bounds[-1] + 1)  # tiny models
        bounds.append(self.total)
        return bounds

    def shard_sizes(self, shards: int) -> list[int]:
        b = self.shard_bounds(shards)
        return [b[i + 1] - b[i] for i in range(shards)]

    def digest(self) -> str:
        """A fingerprint of the names and shapes: two models with it are laid out alike."""
        import hashlib
        text = ";".join(f"{e.name}:{'x'.join(map(str, e.shape))}" for e in self.entries)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> list[dict]:
        return [{"name": e.name, "shape": list(e.shape), "offset": e.offset} for e in self.entries]
