"""Randomized Hadamard rotation (as OptiReduce uses it): spread any loss thinly.

Before sending, a gradient is cut into blocks of ``block`` values (a power of two);
each block is multiplied by random signs and by the orthonormal Walsh-Hadamard matrix.
A lost packet then removes a few coordinates of the *rotated* block, and rotating back
turns that into a small error spread over every value of the block, instead of a hole
where a whole slice of the gradient is missing. Signs come from a seed both ends derive
from the session and the round, so nothing extra crosses the wire. The transform is
its own inverse up to the signs, and costs log2(block) vectorized passes.
"""

from __future__ import annotations

import numpy as np


def block_for(n: int, block: int) -> int:
    """The block actually used for ``n`` values: ``block``, or less for a short vector."""
    b = 1
    while b < min(n, block):
        b *= 2
    return max(b, 1)


def rotated_len(n: int, block: int) -> int:
    b = block_for(n, block)
    return -(-n // b) * b


def _signs(seed: tuple[int, ...], size: int) -> np.ndarray:
    rng = np.random.default_rng(list(seed))
    return (rng.integers(0, 2, size=size, dtype=np.int8) * 2 - 1).astype(np.float32)


def _fwht(blocks: np.ndarray) -> None:
    """In-place orthonormal fast Walsh-Hadamard transform of each row."""
    m, b = blocks.shape
    h = 1
    while h < b:
        view = blocks.reshape(m, b // (2 * h), 2, h)
        top = view[:, :, 0, :].copy()
        view[:, :, 0, :] += view[:, :, 1, :]
        view[:, :, 1, :] *= -1
        view[:, :, 1, :] += top
        h *= 2
    blocks *= np.float32(1.0 / np.sqrt(b))


def rotate(values: np.ndarray, out: np.ndarray, block: int, seed: tuple[int, ...]) -> np.ndarray:
    """Rotate float32 ``values`` into ``out`` (at least :func:`rotated_len` long, padded with zeros)."""
    n = values.size
    b = block_for(n, block)
    size = rotated_len(n, block)
    target = out[:size]
    target[:n] = values
    target[n:] = 0
    target *= _signs(seed, size)
    _fwht(target.reshape(-1, b))
    return target


def unrotate(rotated: np.ndarray, n: int, block: int, seed: tuple[int, ...]) -> np.ndarray:
    """Undo :func:`rotate` in place; returns the first ``n`` values."""
    b = block_for(n, block)
    _fwht(rotated.reshape(-1, b))
    rotated *= _signs(seed, rotated.size)
    return rotated[:n]
