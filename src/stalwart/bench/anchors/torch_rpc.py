"""Anchor: a parameter server written the way PyTorch's RPC tutorials write one.

Written from the documented ``torch.distributed.rpc`` API, after the pattern of the
tutorial on a batch-updating parameter server: the server is an object on rank 0 that
trainers reach through an ``RRef``; a trainer calls ``rpc_sync`` on a static method
marked ``@rpc.functions.async_execution``, which adds the gradient under a lock and
returns a ``torch.futures.Future`` that completes with the updated parameters. With
``batch = 1`` (as here, to match stalwart's ASP benchmark) every call applies its
gradient and answers at once: one call is one push plus one pull. TensorPipe moves the
tensors, over whatever channels it picks on this host.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
import warnings

import torch
import torch.distributed.rpc as rpc

from ...transport.base import free_port

LR = 1e-6


class BatchUpdateParameterServer:
    def __init__(self, size: int, batch: int = 1):
        self.params = torch.zeros(size)
        self.grad = torch.zeros(size)
        self.batch = batch
        self.pending = 0
        self.lock = threading.Lock()
        self.future = torch.futures.Future()

    @staticmethod
    @rpc.functions.async_execution
    def update_and_fetch(ps_rref, grad: torch.Tensor) -> torch.futures.Future:
        self = ps_rref.local_value()
        with self.lock:
            self.grad += grad
            self.pending += 1
            future = self.future
            if self.pending >= self.batch:
                self.params.add_(self.grad, alpha=-LR)
                self.grad.zero_()
                self.pending = 0
                future.set_result(self.params)
                self.future = torch.futures.Future()
        return future


def _train(ps_rref, size: int, seconds: float) -> tuple[int, float]:
    grad = torch.full((size,), 1e-3)
    rpc.rpc_sync(ps_rref.owner(), BatchUpdateParameterServer.update_and_fetch, args=(ps_rref, grad))  # warm-up
    rounds, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        params = rpc.rpc_sync(ps_rref.owner(), BatchUpdateParameterServer.update_and_fetch, args=(ps_rref, grad))
        assert params.numel() == size
        rounds += 1
    return rounds, elapsed


def _rank(rank: int, world: int, port: int, size: int, seconds: float, results) -> None:
    # torch's own deprecation notice about the process group that rpc.shutdown uses
    warnings.filterwarnings("ignore", message="You are using a Backend")
    torch.set_num_threads(1)
    options = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}", num_worker_threads=16,
                                              rpc_timeout=600)
    name = "ps" if rank == 0 else f"trainer{rank}"
    rpc.init_rpc(name, rank=rank, world_size=world, rpc_backend_options=options)
    if rank == 0:
        ps_rref = rpc.RRef(BatchUpdateParameterServer(size))
        futures = [rpc.rpc_async(f"trainer{r}", _train, args=(ps_rref, size, seconds)) for r in range(1, world)]
        results.put([f.wait() for f in futures])
    rpc.shutdown()


def measure(params: int, workers: int, seconds: float) -> dict:
    """Push+pull throughput of ``workers`` trainers against one RPC parameter server."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    env = {"GLOO_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "lo"}
    os.environ.update(env)
    procs = [ctx.Process(target=_rank, args=(r, workers + 1, port, params, seconds, results))
             for r in range(workers + 1)]
    for p in procs:
        p.start()
    try:
        rows = results.get(timeout=seconds + 300)
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    rounds = sum(r[0] for r in rows)
    elapsed = max(r[1] for r in rows)
    return {"round_trips": rounds, "seconds": elapsed, "mb_per_s": rounds * 2 * params * 4 / elapsed / 1e6}
