"""Kill rules and the injector's schedule, against a launcher that records what it is told."""

import math

import pytest

from stalwart.config import ConfigError, JobConfig
from stalwart.faults import FaultInjector, KillRule, parse_kill
from stalwart.metrics import EventLog

from helpers import events


@pytest.mark.parametrize("spec, rule", [
    ("server:0@30s", KillRule("server", 0, at_s=30.0)),
    ("worker:2@clock=200", KillRule("worker", 2, at_clock=200)),
    ("server:1@2.5s,down=5s", KillRule("server", 1, at_s=2.5, down_s=5.0)),
    ("tail:1@3s", KillRule("tail", 1, at_s=3.0)),
])
def test_rules_parse(spec, rule):
    assert parse_kill(spec) == rule


@pytest.mark.parametrize("spec", ["server:0", "scheduler:0@3s", "server:x@3s", "server:0@soon",
                                  "server:0@3s,down=forever"])
def test_bad_rules_are_named(spec):
    with pytest.raises(ValueError, match="expected ROLE:INDEX@WHEN"):
        parse_kill(spec)


def test_config_refuses_a_kill_outside_the_job():
    with pytest.raises(ConfigError, match="names server 5, but the job has 2 servers"):
        JobConfig.validate_dict({"faults": {"kills": ["server:5@3s"]}})
    with pytest.raises(ConfigError, match="chain positions need --recovery chain"):
        JobConfig.validate_dict({"faults": {"kills": ["head:0@3s"]}})
    with pytest.raises(ConfigError, match="a chain of 2 has no middle"):
        JobConfig.validate_dict({"recovery": {"strategy": "chain", "replicas": 2}, "faults": {"kills": ["middle:0@3s"]}})
    with pytest.raises(ConfigError, match="chain replication needs replicas >= 2"):
        JobConfig.validate_dict({"recovery": {"strategy": "chain", "replicas": 1}})
    with pytest.raises(ConfigError, match="restarting a worker is not supported under ElasticBSP"):
        JobConfig.validate_dict({"sync": {"policy": "elastic"}, "faults": {"kills": ["worker:1@3s,down=1s"]}})
    with pytest.raises(ConfigError, match="the only coordinator must come back"):
        JobConfig.validate_dict({"faults": {"kills": ["coordinator:0@3s"]}})
    with pytest.raises(ConfigError, match="names coordinator 1, but the job has 1 coordinators"):
        JobConfig.validate_dict({"faults": {"kills": ["coordinator:1@3s,down=1s"]}})
    with pytest.raises(ConfigError, match="standby coordinators need a store they share"):
        JobConfig.validate_dict({"control": {"standbys": 1}})
    with pytest.raises(ConfigError, match="expected memory or etcd://HOST:PORT"):
        JobConfig.validate_dict({"control": {"store": "zookeeper://x:1"}})
    # With etcd a standby takes over: the killed one need not come back.
    config = JobConfig.validate_dict({"control": {"store": "etcd://127.0.0.1:2379"},
                                      "faults": {"kills": ["coordinator:0@3s", "coordinator:1@6s,down=1s"]}})
    assert config.control.coordinators == 2


class RecordingLauncher:
    def __init__(self):
        self.alive = {("server", 0), ("server", 1), ("worker", 0)}
        self.calls = []

    def running(self):
        return list(self.alive)

    def kill(self, role, index, sig):
        self.calls.append(("kill", role, index, int(sig)))
        self.alive.discard((role, index))

    def start(self, role, index):
        self.calls.append(("start", role, index))
        self.alive.add((role, index))
        return 1234


def test_injector_kills_on_time_and_on_clock_and_restarts_after_the_down_time(tmp_path):
    launcher = RecordingLauncher()
    log = EventLog.for_role(tmp_path, "driver", 0)
    rules = [parse_kill("server:0@2s,down=1s"), parse_kill("worker:0@clock=50"), parse_kill("server:1@9s")]
    inj = FaultInjector(rules, launcher, log, default_down_s=None)
    assert inj.next_due_s() == 2.0 and inj.waiting_on_clock()
    assert inj.tick(1.0, clock=10) == []
    assert inj.tick(2.0, clock=20) == [("server", 0)]
    assert inj.expects_exit("server", 0) and inj.next_due_s() == 3.0
    assert inj.tick(2.5, clock=50) == [("worker", 0)]
    assert inj.next_due_s() == 3.0               # the worker stays down: no restart due
    inj.tick(3.0, clock=60)
    assert launcher.calls == [("kill", "server", 0, 9), ("kill", "worker", 0, 9), ("start", "server", 0)]
    assert not inj.expects_exit("server", 0) and inj.expects_exit("worker", 0)
    assert inj.next_due_s() == 9.0 and not inj.waiting_on_clock()
    inj.tick(9.0, None)
    assert math.isinf(inj.next_due_s())
    log.close()
    assert [(e["member_role"], e["member_index"]) for e in events(tmp_path, "kill")] == [
        ("server", 0), ("worker", 0), ("server", 1)]
    assert [e["at_s"] for e in events(tmp_path, "restart")] == [3.0]


def test_a_role_that_is_not_running_is_not_killed(tmp_path):
    launcher = RecordingLauncher()
    log = EventLog.for_role(tmp_path, "driver", 0)
    inj = FaultInjector([parse_kill("worker:3@1s")], launcher, log)
    assert inj.tick(1.0, None) == [] and launcher.calls == []
    log.close()
    assert events(tmp_path, "kill_skipped")[0]["reason"] == "not running"
