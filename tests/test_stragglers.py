"""Straggler rules: parsing, the delays they inject, and changes of speed."""

import pytest

from stalwart.config import ConfigError, JobConfig
from stalwart.faults import Straggler, StragglerRule, parse_straggler


@pytest.mark.parametrize("spec, rule", [
    ("3:2.0", StragglerRule(3, factor=2.0)),
    ("*:jitter=0.5", StragglerRule(None, jitter=0.5)),
    ("1:2,jitter=0.25@20s", StragglerRule(1, factor=2.0, jitter=0.25, after_s=20.0)),
    ("0:factor=3@clock=500", StragglerRule(0, factor=3.0, after_clock=500)),
])
def test_rules_parse(spec, rule):
    assert parse_straggler(spec) == rule


@pytest.mark.parametrize("spec, message", [
    ("3", "expected WORKER:FACTOR"), ("x:2", "index or '\\*'"), ("3:0.5", "factor must lie in"),
    ("3:fast", "factor must be a number"), ("3:speed=2", "unknown setting 'speed'"),
    ("3:2@tomorrow", "WHEN must be like 20s or clock=500"), ("3:jitter=-1", "jitter must lie in"),
])
def test_bad_rules_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_straggler(spec)


def test_a_factor_sleeps_in_proportion_to_the_measured_step():
    s = Straggler([parse_straggler("1:3.0")], worker=1)
    pause, change = s.delay(0.01, clock=0, elapsed_s=0.0)
    assert pause == pytest.approx(0.02) and change == {"factor": 3.0, "jitter": 0.0, "clock": 0, "elapsed_s": 0.0}
    pause, change = s.delay(0.02, clock=1, elapsed_s=0.1)
    assert pause == pytest.approx(0.04) and change is None
    assert Straggler([parse_straggler("1:3.0")], worker=0).delay(0.01, 0, 0.0) == (0.0, None)


def test_speed_changes_partway_by_time_and_by_clock():
    rules = [parse_straggler(r) for r in ("2:2.0", "2:1.0@10s", "*:4.0@clock=100")]
    s = Straggler(rules, worker=2)
    assert s.delay(0.01, 5, 1.0)[0] == pytest.approx(0.01)
    pause, change = s.delay(0.01, 6, 10.5)
    assert pause == 0.0 and change["factor"] == 1.0       # recovered at 10 s
    pause, change = s.delay(0.01, 100, 11.0)
    assert pause == pytest.approx(0.03) and change["factor"] == 4.0  # slowed again at clock 100


def test_jitter_is_random_but_seeded_with_the_right_mean():
    draws = lambda seed: [Straggler([parse_straggler("*:jitter=0.5")], 1, seed).delay(0.01, c, 0.0)[0]  # noqa: E731
                          for c in range(1)]
    assert draws(0) == draws(0) and draws(0) != draws(1)
    s = Straggler([parse_straggler("*:jitter=0.5")], worker=1, seed=3)
    mean = sum(s.delay(0.01, c, 0.0)[0] for c in range(4000)) / 4000
    assert mean == pytest.approx(0.005, rel=0.1)
    assert s.delay_s == pytest.approx(mean * 4000)


def test_config_refuses_a_straggler_outside_the_job():
    with pytest.raises(ConfigError, match="names worker 7, but the job has 4 workers"):
        JobConfig.validate_dict({"faults": {"stragglers": ["7:2.0"]}})
    with pytest.raises(ConfigError, match="faults.stragglers: .*factor must lie in"):
        JobConfig.validate_dict({"faults": {"stragglers": ["1:0.1"]}})
