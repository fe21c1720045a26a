"""One-pass operations on a shard's float32 vectors (BLAS where it can).

A shard of 100M parameters is 400 MB: every extra pass over it, or a temporary the
size of it, costs a server about as much as receiving the gradient did.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def _blas():
    """scipy's BLAS, imported at first use: the import costs a third of a second, which a
    restarting server should not spend before it can rejoin its job.

    One thread: a server shares the cores with the job's other processes, and OpenBLAS's
    threads wait for work by spinning, so two servers on two cores oversubscribe them. The
    push+pull benchmark at 1M parameters over two servers found a server spending half
    its time in the finiteness check of a 0.5M-value shard (milliseconds where one thread
    takes 0.08 ms). A large shard alone on a machine loses some speed by this (about 1.7x
    on a 25M-value update here), which the transfer of such a shard dwarfs."""
    from scipy.linalg import blas
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1, user_api="blas")
    return blas


def _blas_ready(*arrays: np.ndarray) -> bool:
    return all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays)


def axpy(alpha: float, x: np.ndarray, y: np.ndarray) -> None:
    """``y += alpha * x`` in place, in one pass."""
    if _blas_ready(x, y):
        _blas().saxpy(x, y, a=alpha)  # in place for a contiguous float32 y
    else:
        y += np.float32(alpha) * x


def all_finite(values: np.ndarray) -> bool:
    """No NaN and no infinity in ``values``, in one read pass.

    The sum of absolute values is NaN or infinite if any value is; it may also overflow
    float32 for finite values near its limit, which the exact check (a float64 sum,
    which finite float32 values cannot overflow) then clears.
    """
    if _blas_ready(values) and np.isfinite(_blas().sasum(values)):
        return True
    return bool(np.isfinite(values.sum(dtype=np.float64)))
