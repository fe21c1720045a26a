"""``stalwart bench pushpull``: how fast parameters move, next to how fast the machine can.

For each (model size, workers, servers) it starts the real coordinator and server
processes of a job (ASP, plain SGD), then W client processes that each push a full
gradient and pull the full parameters in a loop for a fixed time. MB/s counts the
parameter bytes moved in both directions by all workers. In the same run it measures
the limit of the path and reports the ratio to it: raw loopback TCP (one sender process,
one receiver process, large ``sendall`` / ``recv_into``) for TCP and LTP, one core's
memcpy for shared memory.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from ..config import JobConfig
from ..layout import ParameterLayout
from ..launch.cluster import Cluster
from ..metrics.events import read_events
from .limits import memcpy_mb_per_s, raw_tcp_mb_per_s

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*$")


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"size {text!r} is not a number with an optional k/M/G suffix")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
    size = int(float(m.group(1)) * scale)
    if size < 1:
        raise ValueError(f"size {text!r} is {size} parameters; a model needs at least one")
    return size


# --- push+pull clients ------------------------------------------------------------------

def _client(shards, bounds, token, worker, seconds, ready, go, results, transport) -> None:
    from ..worker.client import ParameterClient
    client = ParameterClient(shards, bounds, token, worker=worker, transport=transport)
    params = np.zeros(bounds[-1], dtype=np.float32)
    grad = np.full(bounds[-1], 1e-3, dtype=np.float32)
    client.init(params)
    client.pull(params, wait=False)
    ready.put(worker)
    go.wait(120)
    rounds, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        client.push_pull(grad, params, clock=rounds)
        rounds += 1
    results.put((worker, rounds, elapsed, client.bytes_pushed + client.bytes_pulled - 2 * params.nbytes))
    client.leave()
    client.close()


# What the benchmarks call a path, as a transport and whether shared memory may be used.
PATHS = {"tcp": ("tcp", False), "shm": ("tcp", True), "ltp": ("ltp", False)}


def measure(params: int, workers: int, servers: int, transport: str, seconds: float,
             extra: dict | None = None) -> dict:
    """One configuration over ``transport`` (a key of PATHS); ``extra`` adds config
    sections (e.g. a recovery strategy)."""
    transport_name, shm = PATHS[transport]
    config = JobConfig.validate_dict({
        "cluster": {"workers": workers, "servers": servers, "transport": transport_name, "shm": shm},
        "sync": {"policy": "asp"}, "optimizer": {"name": "sgd", "lr": 1e-6, "momentum": 0.0},
        "progress": False, **(extra or {})})
    bounds = ParameterLayout([("weight", (params,))]).shard_bounds(servers)
    with tempfile.TemporaryDirectory(prefix="stalwart-bench-") as run_dir:
        cluster = Cluster.start(config, Path(run_dir), bounds)
        control = None
        try:
            control, shards = cluster.connect("bench")
            ctx = mp.get_context("spawn")
            ready, go, results = ctx.Queue(), ctx.Event(), ctx.Queue()
            procs = [ctx.Process(target=_client, args=(shards, bounds, cluster.token, w, seconds,
                                                       ready, go, results, transport_name)) for w in range(workers)]
            for p in procs:
                p.start()
            # Every client has connected, initialized and pulled once before the clock starts.
            for _ in procs:
                ready.get(timeout=120)
            go.set()
            try:
                rows = [results.get(timeout=seconds + 120) for _ in procs]
            except queue.Empty:
                raise RuntimeError(f"a client did not report within {seconds + 120:g} s "
                                   f"(its traceback, if it failed, is printed above)") from None
            for p in procs:
                p.join(30)
        finally:
            cluster.stop(control)
        server_stats = [e for e in read_events(Path(run_dir)) if e["event"] == "server_stop"]
    rounds = sum(r[1] for r in rows)
    elapsed = max(r[2] for r in rows)
    moved = sum(r[3] for r in rows)
    return {"params": params, "workers": workers, "servers": servers, "transport": transport,
            "round_trips": rounds, "seconds": elapsed,
            "ms_per_round": 1000 * elapsed * workers / rounds if rounds else None,
            "mb_per_s": moved / elapsed / 1e6, "updates_per_s": rounds / elapsed,
            "server_stats": server_stats}


def run_pushpull(sizes: list[int], workers: list[int], servers: list[int], transport: str = "tcp",
                 seconds: float = 3.0, progress: bool = True) -> dict:
    if transport == "shm":
        name, limit = "one core's memcpy", memcpy_mb_per_s(seconds)
    else:
        name, limit = "raw loopback TCP, one stream", raw_tcp_mb_per_s(seconds)
    rows = []
    for size in sizes:
        for s in servers:
            for w in workers:
                row = measure(size, w, s, transport, seconds)
                del row["server_stats"]
                row["limit_mb_per_s"] = limit
                row["ratio_to_limit"] = row["mb_per_s"] / limit
                rows.append(row)
                if progress:
                    print(f"  {size:>11,} params  {w} workers  {s} servers: "
                          f"{row['mb_per_s']:8.0f} MB/s ({row['ratio_to_limit']:.2f} of {name})", flush=True)
    return {"limit": name, "limit_mb_per_s": limit, "rows": rows}
