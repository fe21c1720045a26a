"""A user's own training script as the job's workers: `stalwart run -- COMMAND`."""

import difflib
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import stalwart
from stalwart.cli import main
from stalwart.config import JobConfig
from stalwart.launch import Job, JobFailed
from stalwart.launch.cluster import Cluster
from stalwart.layout import ParameterLayout
from stalwart.worker.flat import FlatModel
from stalwart.worker.optimizer import ParameterServerOptimizer

from helpers import events

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _script_job(tmp_path: Path, script: str, **sections) -> JobConfig:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    return JobConfig.validate_dict({"command": [sys.executable, str(path)], "out": str(tmp_path / "runs"),
                                    "progress": False, **sections})


def test_the_example_converts_in_few_lines_and_learns_under_stalwart_run(tmp_path, capsys):
    plain = (EXAMPLES / "train_digits.py").read_text().splitlines()
    ported = (EXAMPLES / "train_digits_stalwart.py").read_text().splitlines()
    changed = [line for line in difflib.unified_diff(plain, ported, lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert 0 < len(changed) <= 10, changed

    code = main(["run", "--workers", "2", "--servers", "2", "--quiet", "--out", str(tmp_path), "--name", "digits",
                 "--", sys.executable, str(EXAMPLES / "train_digits_stalwart.py"), "--epochs", "6"])
    assert code == 0
    run = tmp_path / "digits"
    import json
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["workers"] == 2
    assert summary["final_accuracy"] > 0.85                       # the accuracy worker 0 logged last
    assert summary["final_accuracy"] == summary["curve"][-1]["accuracy"]
    assert summary["script_metrics"]["epoch"] == 5
    assert summary["iterations_per_worker"][0] == summary["iterations_per_worker"][1] > 0
    layout = json.loads((run / "layout.json").read_text())
    assert layout["bounds"][-1] == layout["total"] == sum(
        p.numel() for p in _example_model().parameters())            # learned from the first worker
    assert (run / "accuracy.png").is_file()
    assert "epoch 5" in (run / "logs" / "worker-0.log").read_text()  # the script's own stdout


def _example_model():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import train_digits
        return train_digits.SmallCNN()
    finally:
        sys.path.remove(str(EXAMPLES))


def test_a_failing_script_ends_the_job_naming_the_worker_its_status_and_stderr(tmp_path):
    config = _script_job(tmp_path, """
        import sys, torch, stalwart
        opt = stalwart.ParameterServerOptimizer(torch.nn.Linear(4, 2))
        if stalwart.worker_index() == 1:
            print("the data loader broke on shard", stalwart.worker_index(), file=sys.stderr)
            sys.exit(3)
        for _ in range(10_000):
            opt.zero_grad(); torch.nn.functional.mse_loss(opt.flat.module(torch.ones(1, 4)), torch.zeros(1, 2)).backward()
            opt.step()
        """, cluster={"workers": 2, "servers": 1})
    with pytest.raises(JobFailed) as failed:
        Job(config).run()
    message = str(failed.value)
    assert "worker 1" in message and "exited with status 3" in message
    assert "the data loader broke on shard 1" in message


def test_a_second_model_is_refused_with_both_sizes_named(tmp_path):
    config = _script_job(tmp_path, """
        import torch, stalwart
        width = 8 if stalwart.worker_index() == 0 else 9
        opt = stalwart.ParameterServerOptimizer(torch.nn.Linear(width, 2))
        opt.close()
        """, cluster={"workers": 2, "servers": 2}, sync={"policy": "asp"})
    with pytest.raises(JobFailed) as failed:
        Job(config).run()
    message = str(failed.value)
    # whichever worker came second is refused: its count and the job's are both named
    sizes = re.search(r"model has (18|20) parameters; the job's servers hold (18|20) ", message)
    assert sizes and sizes[1] != sizes[2] and "every worker must train the same model" in message


def test_outside_a_job_the_api_says_what_is_missing(monkeypatch):
    for name in ("STALWART_SPEC", "STALWART_WORKER", "STALWART_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(stalwart.NotInJob, match="stalwart run"):
        stalwart.ParameterServerOptimizer(torch.nn.Linear(2, 2))
    with pytest.raises(stalwart.NotInJob, match="STALWART_SPEC"):
        stalwart.worker_index()


def test_a_killed_script_worker_restarts_and_the_job_completes(tmp_path):
    config = _script_job(tmp_path, """
        import time, torch, stalwart
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = stalwart.ParameterServerOptimizer(model)
        x = torch.randn(64, 4); y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
        while opt.clock < 300:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            time.sleep(0.01)  # a step of real work
            stalwart.log(loss=loss.item())
        """, cluster={"workers": 2, "servers": 1}, optimizer={"lr": 0.02},
        faults={"kills": ["worker:1@1.5s,down=0.5s"]})
    summary = Job(config).run()
    assert summary["status"] == "completed"
    [kill] = summary["kills"]
    assert kill["role"] == "worker" and kill["restarted_at_s"] is not None
    starts = [e for e in events(Path(summary["run_dir"]), "worker_start") if e["index"] == 1]
    assert len(starts) == 2                                    # the command ran again
    assert summary["script_metrics"]["loss"] < 0.05            # and the model still learned


# --- buffers, dtypes, devices ------------------------------------------------------------

class Norm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)
        self.norm = torch.nn.BatchNorm1d(3)

    def forward(self, x):
        return self.norm(self.linear(x))


def _cluster(tmp_path, model, workers=2, policy="asp"):
    config = JobConfig.validate_dict({"cluster": {"workers": workers, "servers": 2}, "sync": {"policy": policy},
                                      "optimizer": {"lr": 0.05, "momentum": 0.0}, "progress": False})
    return Cluster.start(config, tmp_path, ParameterLayout.from_module(model).shard_bounds(2))


def test_batchnorm_statistics_are_averaged_across_workers_by_the_servers(tmp_path):
    torch.manual_seed(0)
    models = [Norm(), Norm()]
    models[1].load_state_dict(models[0].state_dict())
    cluster = _cluster(tmp_path, models[0])
    control, opts = None, []
    try:
        control, _ = cluster.connect("observer")
        opts = [ParameterServerOptimizer(m, coordinator=cluster.spec.coordinator, token=cluster.token, worker=w,
                                         buffers="average", buffer_every=2) for w, m in enumerate(models)]
        inputs = [torch.randn(16, 3) + 5.0, torch.randn(16, 3) - 5.0]  # the workers see different data
        for step in range(2):
            for opt, model, x in zip(opts, models, inputs):
                opt.zero_grad()
                model(x).pow(2).mean().backward()
                opt.step()
        # step 2 of worker 0 averaged with its own offer only; worker 1's, after it, with both
        mean = lambda m: m.norm.running_mean.clone()  # noqa: E731
        assert not torch.allclose(mean(models[0]), mean(models[1]))
        opts[0].average_buffers()  # now both offers are there
        assert torch.allclose(mean(models[0]), mean(models[1]))
        assert models[0].norm.num_batches_tracked.item() == 2     # integer buffers stay local
        # worker 1 offers statistics far from worker 0's: only the averaging rule brings them over
        models[1].norm.running_mean.fill_(100.0)
        opts[1].average_buffers()

        def two_steps():
            for _ in range(2):
                opts[0].zero_grad()
                models[0](inputs[0]).pow(2).mean().backward()
                opts[0].step()
        opts[0].buffers = "local"
        two_steps()                                              # clock 4: kept local
        assert models[0].norm.running_mean.abs().max() < 30
        opts[0].buffers = "average"
        two_steps()                                              # clock 6: averaged with worker 1's
        assert models[0].norm.running_mean.min() > 30
    finally:
        for opt in opts:
            opt.close()
        cluster.stop(control)


def _train_one_worker(tmp_path, model, staged: bool, steps: int = 30) -> tuple[list[float], torch.Tensor]:
    cluster = _cluster(tmp_path, model, workers=1, policy="bsp")
    control = None
    try:
        control, _ = cluster.connect("observer")
        opt = ParameterServerOptimizer(model, coordinator=cluster.spec.coordinator, token=cluster.token,
                                       staged=staged)
        gen = torch.Generator().manual_seed(1)
        first = next(model.parameters())
        x = torch.randn(64, 3, generator=gen).to(first.device, first.dtype)
        y = x.sum(1, keepdim=True).repeat(1, 3)
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        opt.close()
        return losses, torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    finally:
        cluster.stop(control)


def test_the_staged_device_path_trains_exactly_as_the_aliased_one(tmp_path):
    """What a GPU worker does (parameters apart from float32 host vectors, a copy each
    way), taken on the CPU: bit for bit the training of the aliased path."""
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 3)
    b = torch.nn.Linear(3, 3)
    b.load_state_dict(a.state_dict())
    losses_a, params_a = _train_one_worker(tmp_path / "a", a, staged=False)
    losses_b, params_b = _train_one_worker(tmp_path / "b", b, staged=True)
    assert FlatModel(torch.nn.Linear(3, 3), staged=True).staged
    assert losses_a == losses_b and torch.equal(params_a, params_b)
    assert losses_a[-1] < 0.2 * losses_a[0]


def test_parameters_of_another_dtype_train_against_the_float32_master(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3).double()
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    model.register_parameter("frozen", frozen)
    losses, _ = _train_one_worker(tmp_path, model, staged=False)
    assert model.weight.dtype == torch.float64           # the model keeps its dtype
    assert losses[-1] < 0.2 * losses[0]
    assert torch.equal(model.frozen, torch.ones(2))       # left alone, and not in the layout


def test_staged_gradients_and_scatter_on_mixed_dtypes():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1).double())
    flat = FlatModel(model)
    assert flat.staged and flat.device_params is None      # each parameter copies on its own
    model[1](model[0](torch.ones(1, 2)).double()).sum().backward()
    grads = flat.gathered_grads()
    expected = torch.cat([p.grad.reshape(-1).float() for p in model.parameters()]).numpy()
    assert np.array_equal(grads, expected)
    flat.params_np[:] = np.arange(flat.params_np.size, dtype=np.float32)
    flat.scatter()
    assert torch.equal(model[1].bias, torch.tensor([8.0], dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CPU path is tested above)")
def test_a_model_on_the_gpu_trains_through_pinned_host_buffers(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3).cuda()
    losses, _ = _train_one_worker(tmp_path, model, staged=False)
    assert FlatModel(torch.nn.Linear(3, 3).cuda()).params.is_pinned()
    assert losses[-1] < 0.2 * losses[0]


# --- workers that join and leave ---------------------------------------------------------

JOIN_SCRIPT = """
    import os, sys, torch, stalwart
    torch.manual_seed(0)
    me, done = stalwart.worker_index(), sys.argv[1]
    model = torch.nn.Linear(4, 1)
    x = torch.randn(64, 4); y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    opt = stalwart.ParameterServerOptimizer(model)
    first = None
    while True:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        first = opt.clock if first is None else first
        stalwart.log(loss=loss.item())
        if me == 1 and opt.clock >= 40:               # leaves the job early
            break
        if me == 2 and opt.clock - first >= 100:     # the joiner: 100 steps in the barrier, then leaves
            open(done, "w").close()
            break
        if me == 0 and (os.path.exists(done) or opt.clock >= 20_000):
            break
    opt.close()
"""


def test_under_bsp_a_worker_joins_a_running_job_and_another_leaves(tmp_path, monkeypatch):
    import json
    import threading

    from helpers import wait_until

    monkeypatch.setenv("STALWART_TOKEN", "ab" * 32)  # the job's token, shared with the joiner
    done = tmp_path / "joiner-done"
    config = _script_job(tmp_path, JOIN_SCRIPT, cluster={"workers": 2, "servers": 2, "max_workers": 3},
                         optimizer={"lr": 0.02}, name="join")
    config.command.append(str(done))
    run_dir = tmp_path / "runs" / "join"
    outcome: dict = {}
    job = threading.Thread(target=lambda: outcome.update(summary=Job(config).run()), daemon=True)
    job.start()
    # the job is training once worker 0 has logged its loss
    wait_until(lambda: (run_dir / "events" / "worker-0.jsonl").is_file() and
               '"metrics"' in (run_dir / "events" / "worker-0.jsonl").read_text(), 60, "the job to train")
    code = main(["run", "--join", str(run_dir), "--", sys.executable, str(tmp_path / "script.py"), str(done)])
    assert code == 0
    job.join(60)
    assert not job.is_alive()
    summary = outcome["summary"]
    assert summary["status"] == "completed" and summary["workers"] == 3
    stops = {e["index"]: e for e in events(run_dir, "worker_stop")}
    joined = next(e for e in events(run_dir, "first_step") if e["index"] == 2)
    assert joined["clock"] > 40                       # it came into a job well under way
    assert stops[2]["iterations"] - joined["clock"] >= 99
    assert stops[1]["iterations"] == 40 and stops[0]["iterations"] > stops[2]["iterations"] - 1
    left = {e["worker"] for e in events(run_dir, "worker_left")}
    assert {1, 2} <= left                            # both leavers were let go by the barrier
    assert [j["index"] for j in summary["joined"]] == [2]
    assert summary["script_metrics"]["loss"] < 0.05
    assert json.loads((run_dir / "summary.json").read_text())["joined"][0]["training_after_s"] < 30
    # the job is over: there is nothing left to join, and the refusal says so
    assert main(["run", "--join", str(run_dir), "--", sys.executable, "-c", "pass"]) == 2


def test_joining_is_refused_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("STALWART_TOKEN", raising=False)
    assert main(["run", "--join", str(tmp_path), "--", "true"]) == 2
    assert "not the run directory of a job" in capsys.readouterr().err
    (tmp_path / "spec.json").write_text("{}")
    assert main(["run", "--join", str(tmp_path), "--workers", "3", "--", "true"]) == 2
    assert "--join takes the job's own settings" in capsys.readouterr().err
