"""The price of a run: CPU seconds and memory-time at the configured rates."""

import pytest
from pydantic import ValidationError

from stalwart.metrics.cost import CostRates, lifetimes, price


def _exit(t, role, index, cpu_s, rss_mb):
    return {"t": t, "event": "role_exit", "member_role": role, "member_index": index, "cpu_s": cpu_s,
            "max_rss_mb": rss_mb}


EVENTS = [
    {"t": 0.0, "event": "job_start"},
    {"t": 10.0, "event": "launched"},
    {"t": 1810.0, "event": "kill", "member_role": "server", "member_index": 0},
    _exit(1810.0, "server", 0, 900.0, 1024.0),        # killed: alive 1800 s
    {"t": 2710.0, "event": "restart", "member_role": "server", "member_index": 0},
    _exit(3610.0, "server", 0, 450.0, 2048.0),        # its replacement: alive 900 s
    _exit(3610.0, "worker", 0, 3600.0, 512.0),        # alive 3600 s
]


def test_each_process_lives_from_its_launch_or_restart_to_its_exit():
    assert [(p["role"], p["alive_s"]) for p in lifetimes(EVENTS)] == [
        ("server", 1800.0), ("server", 900.0), ("worker", 3600.0)]


def test_cpu_seconds_and_memory_time_at_the_rates():
    rates = CostRates(vcpu_hour_usd=2.0, gib_hour_usd=1.0)
    got = price(EVENTS, rates)
    assert got["cost_cpu_usd"] == pytest.approx((900 + 450 + 3600) / 3600 * 2.0)
    # GiB-hours: 1 GiB for half an hour, 2 GiB for a quarter, 0.5 GiB for an hour
    assert got["cost_memory_usd"] == pytest.approx(0.5 + 0.5 + 0.5)
    assert got["cost_usd"] == pytest.approx(got["cost_cpu_usd"] + got["cost_memory_usd"])
    # reserved: a whole vCPU per process for its lifetime, whether used or not
    assert got["reserved_usd"] == pytest.approx((1800 + 900 + 3600) / 3600 * 2.0 + 1.5)


def test_no_exits_no_price_and_rates_that_make_no_sense_are_refused():
    assert price(EVENTS[:2], CostRates())["cost_usd"] is None
    with pytest.raises(ValidationError):
        CostRates(vcpu_hour_usd=-1)
    with pytest.raises(ValidationError):
        CostRates(gib_hour_usd=float("nan"))
