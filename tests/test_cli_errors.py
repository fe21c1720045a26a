"""Bad input at the command line: one line on stderr naming the problem, a non-zero
exit, no traceback (unless ``--debug``). One table of cases, every command covered."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from stalwart import cli
from stalwart.config import JobConfig


def _run_dir(root: Path, name: str = "good") -> Path:
    """A small run directory as a job leaves it: config, event logs, a summary."""
    run = root / name
    (run / "events").mkdir(parents=True)
    (run / "config.yaml").write_text(JobConfig.validate_dict({"name": name, "progress": False}).dump_yaml())
    lines = [{"t": 0.0, "event": "job_start"}, {"t": 0.5, "event": "launched"},
             {"t": 1.0, "event": "eval", "elapsed_s": 0.5, "accuracy": 0.5, "loss": 1.2, "version": 10},
             {"t": 2.0, "event": "eval", "elapsed_s": 1.5, "accuracy": 0.91, "loss": 0.3, "version": 40},
             {"t": 2.5, "event": "role_exit", "member_role": "server", "member_index": 0, "returncode": 0,
              "cpu_s": 1.5, "max_rss_mb": 100.0},
             {"t": 3.0, "event": "job_end", "status": "completed", "error": None}]
    (run / "events" / "driver-0.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    (run / "summary.json").write_text(json.dumps({"status": "completed", "error": None}))
    return run


@pytest.fixture
def place(tmp_path):
    """Files and folders the cases name, made on demand."""
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "bad.yaml").write_text("cluster: [\n")
    (tmp_path / "list.yaml").write_text("- 1\n")
    (tmp_path / "unknown.yaml").write_text("nonsense: 1\n")
    damaged = _run_dir(tmp_path, "damaged-config")
    (damaged / "config.yaml").write_text("cluster: [\n")
    noevents = _run_dir(tmp_path, "no-events")
    for f in (noevents / "events").iterdir():
        f.unlink()
    listcfg = _run_dir(tmp_path, "list-config")
    (listcfg / "config.yaml").write_text("- 1\n")
    badcost = _run_dir(tmp_path, "bad-cost")
    (badcost / "config.yaml").write_text((badcost / "config.yaml").read_text() + "cost: {vcpu_hour_usd: -1}\n")
    return lambda name: str(tmp_path / name)


CASES = [
    # (argv with {paths}, expected exit code, words the error line must contain)
    (["train", "--out", "{a-file}/runs"], 2, ["--out", "a-file/runs", "cannot be written"]),
    (["train", "--tensorboard", "{a-file}/tb"], 2, ["--tensorboard", "cannot be written"]),
    (["train", "--config", "{missing.yaml}"], 2, ["config file", "missing.yaml", "does not exist"]),
    (["train", "--config", "{bad.yaml}"], 2, ["bad.yaml", "not valid YAML at line 2"]),
    (["train", "--config", "{list.yaml}"], 2, ["list.yaml", "mapping"]),
    (["train", "--config", "{unknown.yaml}"], 2, ["nonsense", "Extra inputs"]),
    (["train", "--config", "{.}"], 2, ["cannot be read", "Is a directory"]),
    (["train", "--name", "../elsewhere"], 2, ["run name", "plain folder name"]),
    (["train", "--workers", "0"], 2, ["cluster.workers", "greater than or equal to 1"]),
    (["train", "--workers", "many"], 2, ["--workers", "valid integer", "stalwart train --help"]),
    (["train", "--sync", "often"], 2, ["sync policy 'often'"]),
    (["train", "--control", "zk://a:1"], 2, ["control.store", "etcd://HOST:PORT"]),
    (["train", "--standbys", "1"], 2, ["standby coordinators need a store they share"]),
    (["train", "--kill", "coordinator:0@3s"], 2, ["the only coordinator must come back"]),
    (["train", "--control", "etcd://127.0.0.1:1", "--out", "{.}/runs"], 1, ["control store", "127.0.0.1:1", "no answer"]),
    (["experiment", "control", "--scenario", "bogus", "--out", "{.}/x"], 2, ["--scenario 'bogus'", "etcd takeover"]),
    (["experiment", "control", "--duration", "5", "--out", "{.}/x"], 2, ["leaves no training after the kill"]),
    (["train", "--kill", "server"], 2, ["kill 'server'"]),
    (["train", "--kill", "server:9@1s", "--servers", "2"], 2, ["server:9@1s"]),
    (["train", "--straggler", "0:fast"], 2, ["straggler '0:fast'", "number"]),
    (["train", "--down", "soon"], 2, ["--down", "'soon'"]),
    (["train", "--lr", "-1"], 2, ["optimizer.lr"]),
    (["train", "--recovery", "chain", "--replicas", "1"], 2, ["replicas >= 2"]),
    (["train", "--dataset", "imagenet"], 2, ["unknown dataset 'imagenet'"]),
    (["train", "--dataset", "fashion-mnist", "--data-dir", "{nowhere}", "--quiet", "--out", "{runs}"], 2,
     ["fashion-mnist", "nowhere", "nothing is downloaded"]),
    (["experiment", "sync", "--preset", "paper", "--data-dir", "{nowhere}", "--out", "{runs}"], 2,
     ["FashionMNIST", "nowhere", "dataset-fashion-mnist"]),
    (["experiment", "sync", "--preset", "vgg", "--out", "{runs}"], 2, ["unknown preset 'vgg'", "paper"]),
    (["experiment", "sync", "--pattern", "storm", "--out", "{runs}"], 2, ["unknown straggler pattern 'storm'"]),
    (["train", "--model", "no_such_module:factory", "--quiet", "--out", "{runs}"], 2,
     ["no_such_module:factory"]),
    (["train", "--no-such-flag"], 2, ["No such option", "--no-such-flag"]),
    (["report"], 2, ["Missing argument", "stalwart report --help"]),
    (["report", "{nowhere}"], 2, ["nowhere", "not a run directory"]),
    (["report", "{a-file}"], 2, ["a-file", "not a run directory"]),
    (["report", "{damaged-config}"], 2, ["damaged-config/config.yaml", "damaged (line 2)"]),
    (["report", "{list-config}"], 2, ["list-config/config.yaml", "no cluster"]),
    (["report", "{no-events}"], 2, ["no-events", "no event logs"]),
    (["report", "{bad-cost}"], 2, ["bad-cost", "vcpu_hour_usd"]),
    (["report", "{no-events}", "{no-events}", "--out", "{a-file}/overlay.png"], 2,
     ["overlay plot's folder", "cannot be written"]),
    (["bench", "pushpull", "--params", "lots"], 2, ["size 'lots'"]),
    (["bench", "pushpull", "--params", "0"], 2, ["size '0'", "at least one"]),
    (["bench", "pushpull", "--workers", "0"], 2, ["--workers", "greater than or equal to 1"]),
    (["bench", "pushpull", "--transport", "pigeon"], 2, ["transport 'pigeon'"]),
    (["bench", "scaling", "--out", "{a-file}/s"], 2, ["--out", "cannot be written"]),
    (["bench", "anchors", "--system", "mpi"], 2, ["system 'mpi'"]),
    (["bench", "anchors", "--out", "{a-file}/a"], 2, ["--out", "cannot be written"]),
    (["bench", "checkpoint", "--every", "0"], 2, ["--every"]),
    (["bench", "zipline", "--workers", "0"], 2, ["--workers"]),
    (["experiment", "failure", "--strategy", "prayer"], 2, ["strategy 'prayer'"]),
    (["experiment", "failure", "--kills", "3"], 2, ["3 kills need 3 kill times"]),
    (["experiment", "failure", "--out", "{a-file}/f"], 2, ["--out", "cannot be written"]),
    (["experiment", "sync", "--policy", "often"], 2, ["sync policy 'often'"]),
    (["experiment", "sync", "--duration", "0"], 2, ["--duration"]),
    (["experiment", "sync", "--out", "{a-file}/s"], 2, ["--out", "cannot be written"]),
    (["experiment", "transport", "--rate", "-5"], 2, ["--rate and --buffer must be positive"]),
    (["netlab", "run", "--set", "cluster.workers"], 2, ["--set 'cluster.workers'", "field.path=value"]),
    (["netlab", "run", "--set", "cluster.workers=0"], 2, ["cluster.workers"]),
    (["run"], 2, ["Missing argument", "stalwart run --help"]),
    (["run", "--workers", "0", "--", "true"], 2, ["cluster.workers", "greater than or equal to 1"]),
    (["run", "--buffers", "sometimes", "--", "true"], 2, ["train.buffers", "'average' or 'local'"]),
    (["run", "--workers", "3", "--max-workers", "2", "--", "true"], 2, ["max_workers (2) is below workers (3)"]),
    (["run", "--quiet", "--out", "{runs}", "--", "{nowhere}/train.py"], 1,
     ["cannot start worker 0", "nowhere/train.py", "No such file"]),
    (["run", "--join", "{nowhere}", "--", "true"], 2, ["nowhere", "not the run directory of a job"]),
]


def _expand(argv: list[str], place) -> list[str]:
    return [re.sub(r"\{([^}]+)\}", lambda m: place(m.group(1)), a) for a in argv]


@pytest.mark.parametrize("argv, code, words", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_gets_one_line_naming_the_problem(argv, code, words, place, capsys):
    assert cli.main(_expand(argv, place)) == code
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert "Traceback" not in out.err + out.out
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_debug_shows_the_traceback_instead(place):
    with pytest.raises(cli.UserError, match="not a run directory"):
        cli.main(["--debug", "report", place("nowhere")])


def test_a_damaged_summary_is_rebuilt_from_the_event_logs_with_a_warning(tmp_path, capsys):
    run = _run_dir(tmp_path)
    (run / "summary.json").write_text("{not json")
    assert cli.main(["report", str(run), "--json"]) == 0
    out = capsys.readouterr()
    assert "summary.json was damaged; rebuilt it" in out.err
    rebuilt = json.loads((run / "summary.json").read_text())
    assert rebuilt["status"] == "unknown" and rebuilt["final_accuracy"] == 0.91


def test_the_runs_table_keeps_each_run_on_one_line_at_80_columns(tmp_path, monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=screen, width=80))
    base = {"sync": "asp", "workers": 4, "servers": 2, "final_accuracy": 0.9, "time_to_target_s": 12.5,
            "wall_s": 40.1, "updates_applied": 123456, "cost_usd": 0.00123,
            "bytes_by_path": {"shm": 2_000_000_000, "tcp": 1_000_000, "ltp": 0}}
    names = ["stateless-staleness-k1-seed0", "a-run-name-that-is-far-longer-than-any-terminal-allows", "short"]
    cli._print_table([dict(base, run_dir=f"/runs/{n}", recovery=r)
                      for n, r in zip(names, ("stateless", "checkpoint", "chain/strong"))])
    lines = screen.getvalue().rstrip("\n").splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    rows = [line for line in lines if "0.900" in line]
    assert len(rows) == 3                                   # one line each
    assert "2000/1/0" in rows[0] and "0.00123" in rows[0]   # bytes per path, cost
    assert "recovery" in lines[1] and "sync asp" in lines[0]  # what differs is a column; the rest, the title


def test_a_cuda_device_where_there_is_none_is_refused_before_anything_starts(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this host has a CUDA device")
    assert cli.main(["train", "--device", "cuda", "--quiet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "train.device is cuda" in err and "no CUDA device" in err
    assert not any(tmp_path.glob("*/events/server-*.jsonl"))  # no process was started


def test_a_job_token_from_the_environment_is_checked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STALWART_TOKEN", "not-hex")
    assert cli.main(["train", "--quiet", "--out", str(tmp_path)]) == 1
    assert "STALWART_TOKEN must be a hex string" in capsys.readouterr().err
    monkeypatch.setenv("STALWART_TOKEN", "abcd")
    assert cli.main(["train", "--quiet", "--out", str(tmp_path)]) == 1
    assert "needs at least 16" in capsys.readouterr().err
