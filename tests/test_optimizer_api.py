"""The drop-in optimizer inside a user's own training loop, against real server processes."""

import numpy as np
import pytest
import torch

from stalwart.config import JobConfig
from stalwart.data import load_dataset
from stalwart.launch.cluster import Cluster
from stalwart.layout import ParameterLayout
from stalwart.models import build_model
from stalwart.worker.optimizer import ParameterServerOptimizer

pytestmark = pytest.mark.integration


def test_user_loop_trains_through_the_servers(tmp_path):
    ds = load_dataset("digits")
    model = build_model("mlp", ds.input_shape, ds.num_classes, seed=0, hidden=64)
    config = JobConfig.validate_dict({"cluster": {"workers": 1, "servers": 2},
                                      "optimizer": {"name": "adam", "lr": 0.01}, "progress": False})
    cluster = Cluster.start(config, tmp_path, ParameterLayout.from_module(model).shard_bounds(2))
    control = None
    try:
        control, _ = cluster.connect("observer")
        opt = ParameterServerOptimizer(model, coordinator=cluster.spec.coordinator,
                                       token=cluster.token.hex(), worker=0)
        x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
        losses = []
        for step in range(60):
            take = slice((step * 64) % 1400, (step * 64) % 1400 + 64)
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x[take]), y[take])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert opt.version == 60
        assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
        with torch.no_grad():
            acc = (model(torch.from_numpy(ds.x_test)).argmax(1).numpy() == ds.y_test).mean()
        assert acc > 0.8
        opt.close()
    finally:
        cluster.stop(control)
