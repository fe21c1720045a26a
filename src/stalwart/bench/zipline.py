"""How long one ZipLine search takes at scale, next to the paper's C++ ZipLineOptBS."""

from __future__ import annotations

import time

import numpy as np

from ..sync.zipline import zipline

# Seconds per search at n = 1000 workers reported for the paper's C++ ZipLineOptBS.
PAPER_SECONDS = {15: 0.08, 150: 0.56}


def predicted_times(workers: int, lookahead: int, seed: int = 0) -> np.ndarray:
    """ElasticBSP's input: each worker's last push plus k times its own interval."""
    rng = np.random.default_rng(seed)
    last = rng.uniform(0.0, 1.0, (workers, 1))
    interval = rng.lognormal(mean=np.log(0.2), sigma=0.5, size=(workers, 1))
    return last + interval * np.arange(2, lookahead + 2)


def bench_zipline(workers: int, lookahead: int, repeats: int = 20, seed: int = 0) -> dict:
    searches = [predicted_times(workers, lookahead, seed + i) for i in range(repeats)]
    zipline(searches[0])  # warm caches and allocator
    seconds = []
    for times in searches:
        t0 = time.perf_counter()
        zipline(times)
        seconds.append(time.perf_counter() - t0)
    paper = PAPER_SECONDS.get(lookahead) if workers == 1000 else None
    median = float(np.median(seconds))
    return {"workers": workers, "lookahead": lookahead, "repeats": repeats,
            "seconds_per_search": median, "min_s": float(min(seconds)), "max_s": float(max(seconds)),
            "paper_seconds": paper, "speedup_vs_paper": paper / median if paper else None}
