"""Anchor: a parameter server written the way Ray's parameter-server example writes one.

Written from Ray's documented actor API, after the pattern of its asynchronous
parameter-server example: the server is an actor with ``apply_gradients(*gradients)``
(sum, one SGD step, return the weights) and ``get_weights()``; data workers are actors
whose ``compute_gradients(weights)`` returns a gradient; the driver keeps one gradient
in flight per worker, waits for whichever is ready (``ray.wait``), hands it to the
server and gives that worker the server's new weights, all as object references, so
the arrays travel through Ray's object store and never through the driver.

The "computation" returns a fixed gradient (no model runs), so what is measured is the
system moving parameters: one ``apply_gradients`` plus the worker receiving the new
weights is one push plus one pull.
"""

from __future__ import annotations

import time

import numpy as np

LR = 1e-6


def available() -> str | None:
    """None if Ray can be used here, else why not."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return "Ray is not installed (pip install 'stalwart[ray]')"
    return None


def measure(params: int, workers: int, seconds: float) -> dict:
    import ray

    @ray.remote
    class ParameterServer:
        def __init__(self, size: int):
            self.weights = np.zeros(size, dtype=np.float32)

        def apply_gradients(self, *gradients):
            summed = np.sum(gradients, axis=0) if len(gradients) > 1 else gradients[0]
            self.weights -= LR * summed
            return self.weights

        def get_weights(self):
            return self.weights

    @ray.remote
    class DataWorker:
        def __init__(self, size: int):
            self.gradient = np.full(size, 1e-3, dtype=np.float32)

        def compute_gradients(self, weights):
            assert weights.shape == self.gradient.shape
            return self.gradient

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=max(2, workers + 1), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    try:
        ps = ParameterServer.remote(params)
        pool = [DataWorker.remote(params) for _ in range(workers)]
        weights = ps.get_weights.remote()
        in_flight = {w.compute_gradients.remote(weights): w for w in pool}
        # warm-up: one round per worker before the clock starts
        for _ in range(workers):
            (ready,), _ = ray.wait(list(in_flight))
            worker = in_flight.pop(ready)
            weights = ps.apply_gradients.remote(ready)
            in_flight[worker.compute_gradients.remote(weights)] = worker
        rounds, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            (ready,), _ = ray.wait(list(in_flight))
            worker = in_flight.pop(ready)
            weights = ps.apply_gradients.remote(ready)
            in_flight[worker.compute_gradients.remote(weights)] = worker
            rounds += 1
        ray.get(list(in_flight))
        elapsed = time.perf_counter() - start
    finally:
        if started_here:
            ray.shutdown()
    return {"round_trips": rounds, "seconds": elapsed, "mb_per_s": rounds * 2 * params * 4 / elapsed / 1e6}
