import pytest

from stalwart.config import ConfigError, JobConfig


def test_defaults_are_the_demo():
    c = JobConfig()
    assert (c.cluster.workers, c.cluster.servers, c.sync.policy, c.data.dataset, c.model.name) == \
        (4, 2, "bsp", "mnist1d", "cnn1d")
    assert c.cluster.host == "127.0.0.1"  # loopback unless told otherwise


@pytest.mark.parametrize("overrides, field", [
    ({"optimizer.lr": -1}, "optimizer.lr"),
    ({"cluster.workers": 0}, "cluster.workers"),
    ({"sync.policy": "sometimes"}, "sync.policy"),
    ({"data.dataset": "imagenet"}, "data.dataset"),
    ({"model.name": "resnet9000"}, "model.name"),
    ({"cluster.transport": "carrier-pigeon"}, "cluster.transport"),
    ({"train.target_accuracy": 1.5}, "train.target_accuracy"),
    ({"cluster.lease_s": 0.1, "cluster.heartbeat_s": 0.2}, "cluster"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as exc:
        JobConfig.load(None, overrides)
    assert str(exc.value).startswith(field)


def test_yaml_and_flags_merge(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("cluster: {workers: 3}\noptimizer: {name: adam, lr: 0.001}\n")
    c = JobConfig.load(path, {"cluster.servers": 1})
    assert (c.cluster.workers, c.cluster.servers, c.optimizer.name) == (3, 1, "adam")


def test_unknown_keys_are_refused(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("cluster: {wrokers: 3}\n")
    with pytest.raises(ConfigError, match="cluster.wrokers"):
        JobConfig.load(path)
