"""ZipLine: pick one predicted push time per worker so that the chosen times lie closest.

Given an ``n x R`` matrix of predicted push times (row ``i``: worker ``i``'s next ``R``
pushes, ascending), :func:`zipline` returns one column per row such that ``max - min``
of the chosen times is the smallest possible: the "smallest range covering one element
of each of n sorted lists" problem that ElasticBSP solves to place its next barrier.

The paper's ZipLine merges the ``n*R`` points on one timeline and slides a window that
holds one point of every row. We compute the same answer without a Python loop:

1. Sort all points once (stable, so equal times keep their row order): positions
   ``0..nR-1`` on the merged timeline.
2. For a window starting at position ``p``, the window must reach, for every row, that
   row's first point at or after ``p``. Point ``k`` is that "first point at or after p"
   exactly for ``p`` in ``(prev_k, k]``, where ``prev_k`` is the position of the previous
   point of the same row. So the window's end is ``q(p) = max{k : prev_k < p}``, and
   because any such ``k < p`` is smaller than the covering ones, ``q`` is a running
   maximum over start positions: one ``np.maximum.at`` and one ``np.maximum.accumulate``.
3. The range of the window starting at ``p`` is ``time[q(p)] - time[p]``; windows may
   start only where every row still has a point ahead. Take the smallest range, ties to
   the earliest end (the earliest barrier).

The answer is the window ``[lo, hi]``; each row takes its *last* point not after ``hi``:
that point lies in the window and lets the worker do as much work as possible before
it waits. Everything is O(nR log nR) for the sort and O(nR) after it.
"""

from __future__ import annotations

import numpy as np


def zipline(times: np.ndarray) -> tuple[np.ndarray, float]:
    """Return ``(columns, range)``: chosen column per row and ``max - min`` of the choice."""
    times = np.asarray(times, dtype=np.float64)
    if times.ndim != 2 or times.shape[0] == 0 or times.shape[1] == 0:
        raise ValueError(f"zipline needs a non-empty n x R matrix, got shape {times.shape}")
    if not np.isfinite(times).all():
        raise ValueError("zipline needs finite predicted times")
    if times.shape[1] > 1 and (np.diff(times, axis=1) < 0).any():
        raise ValueError("each row of predicted times must be sorted ascending")
    n, r = times.shape
    flat = times.ravel()
    order = np.argsort(flat, kind="stable")
    merged = flat[order]
    position = np.empty(n * r, dtype=np.int64)
    position[order] = np.arange(n * r)
    position = position.reshape(n, r)
    # The first start position at which each point is its row's next point.
    start = np.zeros((n, r), dtype=np.int64)
    start[:, 1:] = position[:, :-1] + 1
    reach = np.full(n * r, -1, dtype=np.int64)
    np.maximum.at(reach, start.ravel(), position.ravel())
    end = np.maximum.accumulate(reach)
    last_start = position[:, -1].min()  # beyond it some row has no point left
    lo = merged[:last_start + 1]
    hi = merged[end[:last_start + 1]]
    ranges = hi - lo
    best = ranges.min()
    tied = np.flatnonzero(ranges == best)
    p = tied[np.argmin(hi[tied])]
    top = hi[p]
    columns = (times <= top).sum(axis=1) - 1
    return columns, float(best)


def zipline_reference(times: np.ndarray) -> tuple[np.ndarray, float]:
    """Brute force over every candidate lower end: the definition, for tests."""
    times = np.asarray(times, dtype=np.float64)
    best: tuple[float, float] | None = None
    for lo in np.unique(times):
        ahead = [row[row >= lo] for row in times]
        if any(len(a) == 0 for a in ahead):
            continue
        hi = max(a[0] for a in ahead)
        key = (hi - lo, hi)
        if best is None or key < best:
            best = key
    assert best is not None
    columns = np.array([np.flatnonzero(row <= best[1])[-1] for row in times])
    return columns, float(best[0])
