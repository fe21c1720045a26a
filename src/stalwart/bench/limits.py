"""What this machine can do at all: the physical limits the benchmarks compare with."""

from __future__ import annotations

import multiprocessing as mp
import socket
import time

import numpy as np


def _sink(sock: socket.socket, chunk: int, ready) -> None:
    conn, _ = sock.accept()
    buf = memoryview(bytearray(chunk))
    ready.set()
    while conn.recv_into(buf):
        pass


def raw_tcp_mb_per_s(seconds: float, chunk: int = 16 << 20) -> float:
    """One stream over loopback, one process at each end: the ceiling for one TCP flow."""
    ctx = mp.get_context("fork")
    listener = socket.create_server(("127.0.0.1", 0))
    ready = ctx.Event()
    proc = ctx.Process(target=_sink, args=(listener, chunk, ready), daemon=True)
    proc.start()
    out = socket.create_connection(listener.getsockname())
    ready.wait(10)
    data = memoryview(bytearray(chunk))
    sent, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        out.sendall(data)
        sent += chunk
    out.close()
    proc.join(10)
    listener.close()
    return sent / elapsed / 1e6


def memcpy_mb_per_s(seconds: float, nbytes: int = 64 << 20) -> float:
    """One core copying memory to memory (numpy's copy): what shared memory can reach."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    copied, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        np.copyto(dst, src)
        copied += nbytes
    return copied / elapsed / 1e6
