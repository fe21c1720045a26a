"""What a run would cost at cloud prices, from what its processes really used.

A run is priced from two measurements its event log already holds: the CPU seconds of
every role process (``role_exit``'s ``cpu_s``, killed processes included) and, per
process, its peak resident memory held for its lifetime (from its launch or restart to
its exit). The rates are per vCPU-hour and per GiB-hour, the two dimensions a
pay-per-use container service bills; the default is AWS Fargate's on-demand Linux/x86
price in us-east-1 (``$0.04048`` per vCPU-hour, ``$0.004445`` per GB-hour), as
published in June 2026. Override them in the job's ``cost`` section.

What this measures is use, not what a provider would bill: a provider bills the vCPUs
and memory a task *reserves* for as long as it runs, idle or not. Use is the fairer
comparison of strategies (a worker that computes through an outage uses CPU that a
worker waiting for a restart does not); ``reserved_usd`` prices the other view, every
process holding one vCPU and its peak memory for its lifetime.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

HOUR_S = 3600.0


class CostRates(BaseModel):
    """The job config's ``cost`` section: prices of a vCPU-hour and a GiB-hour."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    vcpu_hour_usd: float = Field(0.04048, ge=0, le=1000, allow_inf_nan=False)
    gib_hour_usd: float = Field(0.004445, ge=0, le=1000, allow_inf_nan=False)
    source: str = "AWS Fargate on-demand, Linux/x86, us-east-1, June 2026"


def lifetimes(events: list[dict]) -> list[dict]:
    """Each role process that exited: its CPU seconds, peak memory and seconds alive."""
    launched = next((e["t"] for e in events if e["event"] == "launched"),
                    next((e["t"] for e in events if e["event"] == "job_start"), None))
    started: dict[tuple[str, int], float] = {}
    out = []
    for e in events:  # in time order: a restart precedes the exit of the process it started
        if e["event"] == "restart":
            started[(e["member_role"], e["member_index"])] = e["t"]
        elif e["event"] == "role_exit" and e.get("cpu_s") is not None:
            key = (e["member_role"], e["member_index"])
            since = started.pop(key, launched)
            out.append({"role": key[0], "index": key[1], "cpu_s": e["cpu_s"], "max_rss_mb": e["max_rss_mb"],
                        "alive_s": max(0.0, e["t"] - since) if since is not None else None})
    return out


def price(events: list[dict], rates: CostRates) -> dict:
    """``cost_usd`` (CPU used plus memory held) and its parts; None where unmeasured."""
    procs = lifetimes(events)
    if not procs or any(p["alive_s"] is None for p in procs):
        return {"cost_usd": None, "cost_cpu_usd": None, "cost_memory_usd": None, "reserved_usd": None,
                "cost_source": rates.source}
    gib_h = sum(p["max_rss_mb"] / 1024 * p["alive_s"] / HOUR_S for p in procs)
    cpu = sum(p["cpu_s"] for p in procs) / HOUR_S * rates.vcpu_hour_usd
    memory = gib_h * rates.gib_hour_usd
    reserved = sum(p["alive_s"] for p in procs) / HOUR_S * rates.vcpu_hour_usd + memory
    return {"cost_usd": cpu + memory, "cost_cpu_usd": cpu, "cost_memory_usd": memory, "reserved_usd": reserved,
            "cost_source": rates.source}
