"""The ``stalwart`` command line: train, report, bench, experiment, netlab.

Every failure a user can cause ends in one line on stderr that names what is wrong and
where (``error: ...``) and a non-zero exit: 2 for bad input, 1 for a job that failed,
130 for Ctrl-C. Commands raise :class:`UserError` (or call :func:`_fail`) for what they
check themselves; :func:`main` turns what escapes them (an unwritable path, a damaged
file, a usage error from the parser) into such a line too. ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich import box
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="stalwart: parameter-server training that survives failures, stragglers and loss.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (they measure; they are not tests).")
app.add_typer(bench_app, name="bench")
experiment_app = typer.Typer(no_args_is_help=True, help="Experiments: grids of real jobs, aggregated over seeds.")
app.add_typer(experiment_app, name="experiment")
netlab_app = typer.Typer(no_args_is_help=True, help="Run jobs inside an emulated network (namespaces, a bottleneck); root.")
app.add_typer(netlab_app, name="netlab")
console = Console()
err = Console(stderr=True)


# The parser's exception classes, from typer: newer typers carry their own copy of click,
# older ones use click itself; either way they are the bases of typer.BadParameter.
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
NoArgsIsHelpError = getattr(sys.modules[UsageError.__module__], "NoArgsIsHelpError", ())

DEBUG = False  # set by --debug: let exceptions through with their tracebacks


class UserError(Exception):
    """Bad input, found by a check: its message is the whole error line."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def _fail(message: str, code: int = 2) -> None:
    raise UserError(message, code)


def _say_error(message: str) -> None:
    # soft_wrap: one line however long, whatever the terminal's width
    err.print(f"[red]error:[/red] {message}", highlight=False, markup=True, soft_wrap=True)


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="show tracebacks instead of one-line errors")) -> None:
    """The flag is declared here so that the parser accepts it; :func:`main` reads it
    from the arguments before parsing, so that the parser's own errors honour it too."""


def _writable_dir(path: Path, what: str) -> Path:
    """``path`` made (with its parents) and writable, or a one-line error naming it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".stalwart-write-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        _fail(f"{what} {path} cannot be written: {exc.strerror or exc}")
    return path


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML job file; flags override it"),
    workers: Optional[int] = typer.Option(None, help="number of worker processes"),
    servers: Optional[int] = typer.Option(None, help="number of server processes (shards)"),
    sync: Optional[str] = typer.Option(None, help="synchronization policy: bsp | asp | ssp:S | dssp:S:R | elastic:R[:N] (N: span of the smoothed interval)"),
    dataset: Optional[str] = typer.Option(None, help="mnist1d | digits | synthetic | mnist | fashion-mnist | cifar10"),
    data_dir: Optional[Path] = typer.Option(None, help="folder holding local data files"),
    samples: Optional[int] = typer.Option(None, help="examples to generate (mnist1d, synthetic)"),
    model: Optional[str] = typer.Option(None, help="mlp | cnn1d | papercnn | package.module:factory"),
    optimizer: Optional[str] = typer.Option(None, help="server-side optimizer: sgd | adam"),
    lr: Optional[float] = typer.Option(None, help="learning rate"),
    momentum: Optional[float] = typer.Option(None, help="SGD momentum"),
    batch_size: Optional[int] = typer.Option(None, help="per-worker batch size"),
    duration: Optional[float] = typer.Option(None, help="seconds of training"),
    epochs: Optional[float] = typer.Option(None, help="epochs over each worker's shard"),
    target_accuracy: Optional[float] = typer.Option(None, help="report the time to reach this test accuracy"),
    stop_at_target: Optional[bool] = typer.Option(None, help="stop once the target accuracy is reached"),
    eval_every: Optional[float] = typer.Option(None, help="seconds between the evaluator's test passes (default 1)"),
    eval_subset: Optional[int] = typer.Option(
        None, help="test examples each periodic pass scores (a fixed seeded draw; default all; the final pass scores all)"),
    overlap: Optional[bool] = typer.Option(
        None, help="push gradient buckets while backward runs (default off: see docs/benchmarks.md)"),
    bucket_mb: Optional[float] = typer.Option(None, help="largest gradient bucket pushed during backward, MB (25)"),
    seed: Optional[int] = typer.Option(None, help="seed of data, initial weights and shuffling"),
    device: Optional[str] = typer.Option(None, help="where workers compute: cpu | cuda | auto"),
    recovery: Optional[str] = typer.Option(
        None, help="what survives a dead server: none | checkpoint | chain | stateless"),
    replicas: Optional[int] = typer.Option(None, help="chain: server processes per shard (>= 2)"),
    chain_mode: Optional[str] = typer.Option(None, help="chain: strong (ack at the tail) | relaxed (state every N updates)"),
    checkpoint_every: Optional[int] = typer.Option(
        None, help="checkpoint: snapshot every N updates; relaxed chain: send the state every N updates"),
    flush_rule: Optional[str] = typer.Option(
        None, help="stateless: how a worker's backlog is applied: sum | mean | staleness | clip | outer"),
    backlog_max: Optional[int] = typer.Option(None, help="stateless: local steps a worker may owe a shard"),
    kill: Optional[list[str]] = typer.Option(
        None, "--kill", help="SIGKILL a role: server:0@30s | worker:1@clock=200 | server:0@20s,down=5s | "
                             "head:0@10s (chain position of shard 0; also middle, tail) | "
                             "coordinator:0@8s,down=2s (repeatable)"),
    down: Optional[str] = typer.Option(None, help="restart killed roles after this long, e.g. 20s"),
    straggler: Optional[list[str]] = typer.Option(
        None, "--straggler", help="slow a worker: 3:2.0 | *:jitter=0.5 | 3:1.0@20s | 0:3.0@clock=500 (repeatable)"),
    host: Optional[str] = typer.Option(
        None, help="address servers bind to (default loopback; 0.0.0.0 on Ray: each node's own address)"),
    launcher: Optional[str] = typer.Option(None, help="where roles run: local (processes here) | ray (Ray actors)"),
    control: Optional[str] = typer.Option(
        None, help="where the coordinator's state lives: memory (rebuilt from the roles after a restart) | "
                   "etcd://HOST:PORT (saved in etcd, with a standby coordinator ready to take over)"),
    standbys: Optional[int] = typer.Option(None, help="etcd: standby coordinator processes (default 1)"),
    ray_address: Optional[str] = typer.Option(
        None, help="ray: the cluster to join: auto | HOST:PORT | local (a private instance for this job)"),
    transport: Optional[str] = typer.Option(None, help="transport of pushes: tcp | ltp (loss-tolerant UDP)"),
    shm: Optional[bool] = typer.Option(None, "--shm/--no-shm",
                                       help="tcp: shared memory between a worker and a server on one host (default on)"),
    ltp_fill: Optional[str] = typer.Option(None, help="ltp: what fills lost ranges: rescale | zero | previous"),
    ltp_hadamard: Optional[bool] = typer.Option(None, "--ltp-hadamard/--no-ltp-hadamard",
                                                help="ltp: randomized Hadamard rotation before sending"),
    ltp_min_fraction: Optional[float] = typer.Option(None, help="ltp: least fraction of a push a round closes with"),
    ltp_drop: Optional[float] = typer.Option(None, help="ltp: the server drops this fraction of packets on purpose"),
    out: Optional[Path] = typer.Option(None, help="parent folder of run directories"),
    name: Optional[str] = typer.Option(None, help="run directory name"),
    tensorboard: Optional[Path] = typer.Option(None, help="also write TensorBoard event files here"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no live progress display"),
) -> None:
    """Train a model on a parameter server; leaves a run directory with logs, summary and plots."""
    options = dict(locals())
    _run_job(_job_config(options.pop("config"), options))


# Each option of `train` and `run`, and the config field it sets.
OPTION_FIELDS = {
    "workers": "cluster.workers", "max_workers": "cluster.max_workers", "servers": "cluster.servers",
    "host": "cluster.host",
    "launcher": "cluster.launcher", "ray_address": "cluster.ray_address", "control": "control.store",
    "standbys": "control.standbys", "transport": "cluster.transport", "shm": "cluster.shm",
    "sync": "sync.policy", "dataset": "data.dataset", "data_dir": "data.data_dir", "samples": "data.samples",
    "batch_size": "data.batch_size", "model": "model.name", "optimizer": "optimizer.name",
    "lr": "optimizer.lr", "momentum": "optimizer.momentum", "duration": "train.duration_s",
    "epochs": "train.epochs", "target_accuracy": "train.target_accuracy",
    "stop_at_target": "train.stop_at_target",
    "eval_every": "train.eval_interval_s", "eval_subset": "train.eval_subset", "overlap": "train.overlap",
    "bucket_mb": "train.bucket_mb", "seed": "train.seed", "device": "train.device",
    "buffers": "train.buffers", "buffer_every": "train.buffer_every", "straggler": "faults.stragglers",
    "kill": "faults.kills", "down": "faults.down_s", "recovery": "recovery.strategy",
    "checkpoint_every": "recovery.every_updates", "replicas": "recovery.replicas", "chain_mode": "recovery.mode",
    "flush_rule": "recovery.flush_rule", "backlog_max": "recovery.backlog_max", "ltp_fill": "ltp.fill",
    "ltp_hadamard": "ltp.hadamard", "ltp_min_fraction": "ltp.min_fraction", "ltp_drop": "ltp.drop",
    "out": "out", "name": "name", "tensorboard": "tensorboard", "quiet": "progress", "command": "command",
}


def _job_config(config: Path | None, options: dict):
    """The job that a config file and the given options describe (a one-line error if none)."""
    from .config import ConfigError, JobConfig

    convert = {"down": lambda v: _seconds(v), "quiet": lambda v: False if v else None,
               "straggler": lambda v: v or None, "kill": lambda v: v or None, "command": lambda v: v or None}
    overrides = {}
    for option, value in options.items():
        value = convert.get(option, lambda v: v)(value) if value is not None else None
        overrides[OPTION_FIELDS[option]] = str(value) if isinstance(value, Path) else value
    try:
        return JobConfig.load(config, overrides)
    except ConfigError as exc:
        _fail(f"config error: {exc}")


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    command: list[str] = typer.Argument(..., help="the worker command, after --: e.g. -- python train.py --epochs 3",
                                        show_default=False),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML job file; flags override it"),
    workers: Optional[int] = typer.Option(None, help="number of worker processes (each runs COMMAND)"),
    max_workers: Optional[int] = typer.Option(None, help="most workers at once, joiners included (default 2x --workers)"),
    servers: Optional[int] = typer.Option(None, help="number of server processes (shards)"),
    sync: Optional[str] = typer.Option(None, help="synchronization policy: bsp | asp | ssp:S | dssp:S:R | elastic:R[:N]"),
    optimizer: Optional[str] = typer.Option(None, help="server-side optimizer: sgd | adam"),
    lr: Optional[float] = typer.Option(None, help="learning rate (the servers apply it)"),
    momentum: Optional[float] = typer.Option(None, help="SGD momentum"),
    duration: Optional[float] = typer.Option(None, help="stop the job after this many seconds (default: when the workers end)"),
    seed: Optional[int] = typer.Option(None, help="seed of each worker's share (stalwart.shard)"),
    buffers: Optional[str] = typer.Option(None, help="model buffers (BatchNorm statistics): average | local"),
    buffer_every: Optional[int] = typer.Option(None, help="steps between buffer averagings"),
    recovery: Optional[str] = typer.Option(None, help="what survives a dead server: none | checkpoint | chain | stateless"),
    replicas: Optional[int] = typer.Option(None, help="chain: server processes per shard (>= 2)"),
    chain_mode: Optional[str] = typer.Option(None, help="chain: strong | relaxed"),
    kill: Optional[list[str]] = typer.Option(None, "--kill", help="SIGKILL a role: worker:1@10s,down=2s | server:0@5s (repeatable)"),
    down: Optional[str] = typer.Option(None, help="restart killed roles after this long, e.g. 2s"),
    straggler: Optional[list[str]] = typer.Option(None, "--straggler", help="slow a worker: 1:2.0 | *:jitter=0.5 (repeatable)"),
    transport: Optional[str] = typer.Option(None, help="transport of pushes: tcp | ltp"),
    overlap: Optional[bool] = typer.Option(
        None, help="push gradient buckets while backward runs (default off; not for a loop that calls backward() "
                   "more than once per step)"),
    launcher: Optional[str] = typer.Option(None, help="where roles run: local | ray"),
    ray_address: Optional[str] = typer.Option(None, help="ray: auto | HOST:PORT | local"),
    control: Optional[str] = typer.Option(None, help="coordinator state: memory | etcd://HOST:PORT"),
    host: Optional[str] = typer.Option(None, help="address servers bind to (default loopback)"),
    out: Optional[Path] = typer.Option(None, help="parent folder of run directories"),
    name: Optional[str] = typer.Option(None, help="run directory name"),
    tensorboard: Optional[Path] = typer.Option(None, help="also write the workers' stalwart.log metrics here"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no live progress display"),
    join: Optional[Path] = typer.Option(
        None, "--join", help="join the running job of this run directory as one more worker (needs the job's "
                             "STALWART_TOKEN in the environment); the other options are the job's"),
) -> None:
    """Run your own training script as the job's workers: `stalwart run -- python train.py`.

    Starts the coordinator and the servers, then runs COMMAND once per worker with the job
    in its environment; in the script, `stalwart.ParameterServerOptimizer(model)` joins it."""
    options = dict(locals())
    if (run_dir := options.pop("join")) is not None:
        _join_job(run_dir, command, {k: v for k, v in options.items() if k != "command"})
        return
    _run_job(_job_config(options.pop("config"), options))


def _join_job(run_dir: Path, command: list[str], options: dict) -> None:
    """COMMAND as one more worker of the running job in ``run_dir``; exits with its status."""
    import subprocess

    from .spec import job_token, worker_env
    from .worker.session import NotInJob, WorkerSession, reserve_worker_slot

    if given := [k for k, v in options.items() if v not in (None, False)]:
        _fail(f"--join takes the job's own settings; drop {', '.join('--' + k.replace('_', '-') for k in given)}")
    try:
        spec, token = WorkerSession.job_of(run_dir), job_token()
        index = reserve_worker_slot(spec, token)
    except (NotInJob, ValueError) as exc:
        _fail(str(exc))
    env = {**os.environ, **worker_env(run_dir / "spec.json", index, token)}
    console.print(f"joining {run_dir} as worker {index}: {' '.join(command)}")
    try:
        code = subprocess.call(command, env=env)
    except OSError as exc:
        _fail(f"cannot run {' '.join(command)!r}: {exc.strerror or exc}")
    if code != 0:
        _fail(f"worker {index} ({' '.join(command)}) exited with status {code}", code=1)


def _check_outputs(job_config) -> None:
    """The folders a job writes into, made and writable before any process starts."""
    _writable_dir(Path(job_config.out), "--out")
    if job_config.tensorboard is not None:
        _writable_dir(Path(job_config.tensorboard), "--tensorboard")


def _run_job(job_config, placement: dict | None = None) -> None:
    from .data import DatasetError
    from .launch import Job, JobFailed

    _check_outputs(job_config)
    job = Job(job_config, placement)
    try:
        summary = job.run()
    except (DatasetError, ValueError, TypeError) as exc:
        _fail(str(exc))
    except JobFailed as exc:
        _fail(f"job failed: {exc}", code=1)
    except KeyboardInterrupt:
        _fail(f"interrupted; partial results in {job.run_dir}", code=130)
    _print_table([summary])
    console.print(f"run directory: {summary['run_dir']}")


def _seconds(text: str) -> float:
    try:
        return float(text.removesuffix("s"))
    except ValueError:
        _fail(f"--down takes a duration like 20s, got {text!r}")


def _print_table(summaries: list[dict]) -> None:
    """One run per line at 80 columns: what all runs share goes into the title, a run
    name too long for what is left is cut short (its directory is printed in full below)."""
    shared = {"sync": lambda s: s["sync"], "w/s": lambda s: f"{s['workers']}/{s['servers']}",
              "recovery": lambda s: s.get("recovery", "none"), "transport": lambda s: s.get("transport", "tcp")}
    varying = [k for k, get in shared.items() if len({get(s) for s in summaries}) > 1]
    title = ", ".join(f"{k} {shared[k](summaries[0])}" for k in shared if k not in varying)
    columns = {k: shared[k] for k in varying}
    columns.update({
        "final": lambda s: _fmt(s["final_accuracy"]),
        "target s": lambda s: "-" if s.get("time_to_target_s") is None else f"{s['time_to_target_s']:.1f}",
        "wall s": lambda s: _fmt(s["wall_s"], 1),
        "updates": lambda s: str(s["updates_applied"]),
        "MB shm/tcp/ltp": lambda s: "/".join(f"{n / 1e6:.0f}" for n in _paths(s)),
        "cost $": lambda s: "-" if s.get("cost_usd") is None else f"{s['cost_usd']:.5f}",
    })
    cells = [[get(s) for get in columns.values()] for s in summaries]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(columns)]
    table = Table(title=f"runs: {title}" if title else "runs", box=box.SIMPLE_HEAD, padding=0,
                  pad_edge=False, show_edge=False, title_justify="left")
    table.add_column("run", no_wrap=True, overflow="ellipsis",
                     max_width=max(8, console.width - sum(widths) - len(widths)))
    for header, width in zip(columns, widths):
        table.add_column(header, justify="right", no_wrap=True, min_width=width)
    for s, row in zip(summaries, cells):
        table.add_row(Path(s["run_dir"]).name, *row)
    console.print(table)


def _paths(summary: dict) -> list[int]:
    paths = summary.get("bytes_by_path") or {}
    return [paths.get(p, 0) for p in ("shm", "tcp", "ltp")]


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="run directories"),
    out: Optional[Path] = typer.Option(None, help="overlay plot of all runs (default: report.png here)"),
    as_json: bool = typer.Option(False, "--json", help="print the summaries as JSON"),
) -> None:
    """Rebuild summaries and plots of finished runs and compare them."""
    from .metrics.plots import MAX_STYLES, plot_runs
    from .metrics.summary import RunDirError, write_summary

    overlay = out or Path("report.png")
    if len(runs) > 1:
        _writable_dir(overlay.parent, "the overlay plot's folder")
    summaries = []
    for run in runs:
        try:
            summaries.append(write_summary(run, status=None))  # the status on record; plots only with a curve
        except RunDirError as exc:
            _fail(str(exc))
        if summaries[-1].get("rebuilt_from_damaged"):
            err.print(f"warning: {run}/summary.json was damaged; rebuilt it from the event logs "
                      f"(status unknown)", highlight=False, soft_wrap=True)
    if len(summaries) > MAX_STYLES:
        err.print(f"warning: no overlay plot: {len(summaries)} runs are more than the {MAX_STYLES} lines one "
                  f"plot keeps apart", highlight=False, soft_wrap=True)
    elif len(summaries) > 1:
        path = plot_runs(summaries, overlay)
        console.print(f"overlay plot: {path}")
    if as_json:
        print(json.dumps([{k: v for k, v in s.items() if k not in ("curve", "local_curve")} for s in summaries], indent=1))
    else:
        _print_table(summaries)


def _check_path(transport: str) -> None:
    """A benchmark's path by name (tcp, shm, ltp), or a clear error."""
    from .bench.pushpull import PATHS

    if transport not in PATHS:
        _fail(f"unknown transport {transport!r}; choose one of {', '.join(PATHS)}")


@bench_app.command("pushpull")
def bench_pushpull(
    params: list[str] = typer.Option(["1M", "10M", "100M"], "--params", "-p", help="model sizes, e.g. 1M 25M"),
    workers: list[int] = typer.Option([1, 4], "--workers", "-w", min=1),
    servers: list[int] = typer.Option([1], "--servers", "-s", min=1),
    transport: str = typer.Option("tcp", help="tcp (sockets only) | shm (tcp with shared memory) | ltp"),
    seconds: float = typer.Option(3.0, min=0.1, help="measuring time per configuration"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Push+pull throughput (MB/s of parameters moved) against the path's limit (raw loopback TCP; memcpy for shm)."""
    from .bench.pushpull import parse_size, run_pushpull

    _check_path(transport)
    try:
        sizes = [parse_size(p) for p in params]
    except ValueError as exc:
        _fail(str(exc))
    result = run_pushpull(sizes, workers, servers, transport, seconds, progress=not as_json)
    if as_json:
        print(json.dumps(result, indent=1))
        return
    table = Table(title=f"push+pull over {transport}; {result['limit']} {result['limit_mb_per_s']:.0f} MB/s")
    for col in ("params", "workers", "servers", "round trips", "ms/round", "MB/s", "ratio to limit"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(f"{r['params']:,}", str(r["workers"]), str(r["servers"]), str(r["round_trips"]),
                      f"{r['ms_per_round']:.2f}", f"{r['mb_per_s']:.0f}", f"{r['ratio_to_limit']:.2f}")
    console.print(table)


@bench_app.command("anchors")
def bench_anchors(
    params: list[str] = typer.Option(["1M", "10M", "100M"], "--params", "-p", help="model sizes"),
    workers: list[int] = typer.Option([1, 4], "--workers", "-w", min=1),
    system: Optional[list[str]] = typer.Option(
        None, "--system", help="only these: stalwart/tcp stalwart/shm stalwart/ltp torch-rpc ray-actor (repeatable)"),
    seconds: float = typer.Option(3.0, min=0.5, help="measuring time per row"),
    out: Optional[Path] = typer.Option(None, help="also write results.json and results.md here"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Push+pull throughput of stalwart against a torch.rpc and a Ray parameter server, and the machine's limits."""
    from .bench.anchors import SYSTEMS, render_markdown, run_anchors
    from .bench.pushpull import parse_size

    if out is not None:
        _writable_dir(out, "--out")
    chosen = tuple(system or SYSTEMS)
    if unknown := [s for s in chosen if s not in SYSTEMS]:
        _fail(f"unknown system {unknown[0]!r}; choose among {', '.join(SYSTEMS)}")
    try:
        sizes = [parse_size(p) for p in params]
    except ValueError as exc:
        _fail(str(exc))
    result = run_anchors(sizes, workers, seconds, chosen,
                         progress=None if as_json else (lambda line: console.print(line, highlight=False)))
    table = render_markdown(result)
    if out is not None:
        (out / "results.json").write_text(json.dumps(result, indent=1))
        (out / "results.md").write_text(table)
    print(json.dumps(result, indent=1) if as_json else table)  # plain: a markdown table must not wrap


@bench_app.command("training")
def bench_training(
    workload: list[str] = typer.Option(["demo"], "--workload", help="demo (MNIST-1D, 1-D CNN) | paper (papercnn on FashionMNIST)"),
    system: Optional[list[str]] = typer.Option(
        None, "--system", help="stalwart/POLICY[/no-overlap] | ddp-gloo | single (repeatable; default: "
                               "BSP and ASP with and without overlap, DDP over gloo, a single process)"),
    workers: int = typer.Option(4, min=1, max=64, help="worker processes (stalwart and DDP)"),
    servers: int = typer.Option(2, min=1, max=16, help="stalwart's servers"),
    duration: float = typer.Option(20.0, min=1.0, help="seconds of training per system"),
    eval_every: float = typer.Option(1.0, min=0.1, help="seconds between evaluations"),
    eval_subset: Optional[int] = typer.Option(None, min=0, help="test examples each periodic evaluation scores, "
                                              "on every system (default 1000; 0: all; the final one scores all)"),
    target: Optional[float] = typer.Option(None, min=0.01, max=1.0, help="the accuracy whose time is reported "
                                                                        "(default: 0.9 on demo, 0.75 on paper)"),
    out: Path = typer.Option(Path("experiments/training"), help="folder for results.json, results.md, runs/"),
    as_json: bool = typer.Option(False, "--json", help="print the rows as JSON instead of the table"),
) -> None:
    """Training speed of stalwart against DDP over gloo and a single process, on the same work."""
    from .bench import training

    for name in workload:
        if name not in training.WORKLOADS:
            _fail(f"unknown workload {name!r}; choose one of {sorted(training.WORKLOADS)}")
        if (why := training.workload_missing(name)) is not None:
            _fail(why)
    system = system or list(training.SYSTEMS)
    for name in system:
        try:
            training.parse_system(name)
        except ValueError as exc:
            _fail(f"--system {name!r}: {exc}")
    _writable_dir(out, "--out")
    result = training.run_training(workload, system, workers, servers, duration, eval_every, target, out,
                                   progress=None if as_json else lambda line: console.print(line, highlight=False),
                                   eval_subset=training.EVAL_SUBSET if eval_subset is None else eval_subset or None)
    training.write(result, out)
    if as_json:
        print(json.dumps(result["rows"], indent=1))
        return
    print(training.render_markdown(result))
    console.print(f"results: {out}/results.md, {out}/results.json")


@bench_app.command("scaling")
def bench_scaling(
    params: str = typer.Option("10M", "--params", "-p", help="model size of the workers x servers sweep"),
    workers: list[int] = typer.Option([1, 2, 4, 8], "--workers", "-w", min=1),
    servers: list[int] = typer.Option([1, 2, 4], "--servers", "-s", min=1),
    sizes: list[str] = typer.Option(["100k", "1M", "10M", "100M"], "--size", help="model sizes of the size sweep"),
    transport: str = typer.Option("shm", help="tcp | shm | ltp"),
    seconds: float = typer.Option(3.0, min=0.5, help="measuring time per point"),
    out: Path = typer.Option(Path("experiments/scaling"), help="folder for results.json, results.md, scaling.png"),
) -> None:
    """Aggregate throughput as workers and servers grow, and round time as the model grows."""
    _writable_dir(out, "--out")
    from .bench import scaling
    from .bench.pushpull import parse_size

    _check_path(transport)
    try:
        size, swept = parse_size(params), [parse_size(p) for p in sizes]
    except ValueError as exc:
        _fail(str(exc))
    result = scaling.run_scaling(size, workers, servers, swept, transport, seconds,
                                 progress=lambda line: console.print(line, highlight=False))
    scaling.write(result, out)
    print(scaling.render_markdown(result))
    console.print(f"results: {out}/results.md, {out}/results.json, {out}/scaling.png")


@bench_app.command("checkpoint")
def bench_checkpoint(
    params: list[str] = typer.Option(["1M", "10M"], "--params", "-p", help="model sizes"),
    workers: int = typer.Option(4, "--workers", "-w", min=1),
    every: int = typer.Option(200, min=1, help="snapshot every N updates (the default interval)"),
    seconds: float = typer.Option(5.0, help="measuring time per run"),
    repeats: int = typer.Option(3, min=1, help="alternating runs per mode (median reported)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Updates/s with and without checkpointing: the cost of surviving a server crash."""
    from .bench.checkpoint import bench_checkpoint as run
    from .bench.pushpull import parse_size

    try:
        sizes = [parse_size(p) for p in params]
    except ValueError as exc:
        _fail(str(exc))
    rows = [run(size, workers, every, seconds, repeats) for size in sizes]
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table(title=f"checkpoint every {every} updates, {workers} workers, 1 server (median of {repeats})")
    for col in ("params", "updates/s none", "updates/s checkpoint", "overhead", "snapshots",
                "snapshot ms", "persist ms"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['params']:,}", f"{r['updates_per_s_none']:.0f}", f"{r['updates_per_s_checkpoint']:.0f}",
                      f"{100 * r['overhead']:+.1f}%", str(r["snapshots"]), _fmt(r["snapshot_ms"], 2),
                      _fmt(r["persist_ms"], 1))
    console.print(table)


@bench_app.command("zipline")
def bench_zipline(
    workers: int = typer.Option(1000, "--workers", "-n", min=1, help="rows: workers"),
    lookahead: list[int] = typer.Option([15, 150], "--lookahead", "-r", min=1, help="columns: predicted pushes"),
    repeats: int = typer.Option(20, min=1, help="searches timed (median reported)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON (one object per lookahead)"),
) -> None:
    """Seconds per ZipLine search, next to the paper's C++ figures (n=1000)."""
    from .bench.zipline import bench_zipline as run

    rows = [run(workers, r, repeats) for r in lookahead]
    if as_json:
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=1))
        return
    table = Table(title=f"ZipLine, {workers} workers (median of {repeats} searches)")
    for col in ("lookahead R", "seconds/search", "paper (C++)", "faster by"):
        table.add_column(col, justify="right")
    for r in rows:
        paper = r["paper_seconds"]
        table.add_row(str(r["lookahead"]), f"{r['seconds_per_search']:.4f}",
                      "-" if paper is None else f"{paper:.2f}",
                      "-" if paper is None else f"{r['speedup_vs_paper']:.0f}x")
    console.print(table)


@experiment_app.command("sync")
def experiment_sync(
    out: Path = typer.Option(Path("experiments/sync"), help="folder for results, plots and runs (one folder per pattern)"),
    preset: str = typer.Option("demo", help="demo (MNIST-1D, minutes) | paper (the paper's CNN on FashionMNIST, "
                                            "three straggler patterns, hours)"),
    quick: bool = typer.Option(False, "--quick", help="smoke check: 1 seed, short runs (demo 12 s; paper 20 s, "
                                                      "BSP and ElasticBSP, one pattern)"),
    seeds: Optional[int] = typer.Option(None, min=1, help="seeds per policy (default 3; 1 with --quick)"),
    duration: Optional[float] = typer.Option(None, min=1, help="seconds per run (demo 40, paper 120)"),
    policy: Optional[list[str]] = typer.Option(None, "--policy", help="policies to compare (repeatable)"),
    pattern: Optional[list[str]] = typer.Option(None, "--pattern", help="straggler patterns to run: straggler | "
                                                                         "jitter | shift (repeatable)"),
    straggler: Optional[list[str]] = typer.Option(None, "--straggler", help="straggler rules of one custom "
                                                                             "pattern, instead of the preset's"),
    workers: int = typer.Option(4, min=1),
    servers: int = typer.Option(2, min=1),
    batch_size: Optional[int] = typer.Option(None, min=1, help="per-worker batch (demo 64, paper 32)"),
    dataset: Optional[str] = typer.Option(None, help="data set of every run (the preset's by default)"),
    model: Optional[str] = typer.Option(None, help="model of every run (the preset's by default)"),
    lr: Optional[float] = typer.Option(None, min=0.0, help="SGD learning rate (demo 0.05, paper 0.01)"),
    data_dir: Optional[Path] = typer.Option(None, help="folder of local data files (paper: FashionMNIST, "
                                                       "by default where Debian's package puts it)"),
    target_accuracy: Optional[float] = typer.Option(None, min=0.01, max=1.0, help="demo 0.9, paper 0.85"),
) -> None:
    """BSP, ASP, SSP, DSSP and ElasticBSP on one workload, under each straggler pattern."""
    import dataclasses

    _writable_dir(out, "--out")
    from .config import ConfigError, JobConfig
    from .data.datasets import fashion_mnist_missing
    from .experiments.sync import PRESETS, base_config, patterns, render_markdown, run_patterns
    from .sync import parse_policy

    if preset not in PRESETS:
        _fail(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    chosen = PRESETS[preset].with_quick() if quick else PRESETS[preset]
    chosen = dataclasses.replace(
        chosen, seeds=seeds or chosen.seeds, duration_s=duration or chosen.duration_s,
        policies=tuple(policy or chosen.policies), patterns=tuple(pattern or chosen.patterns),
        batch_size=batch_size or chosen.batch_size, dataset=dataset or chosen.dataset, model=model or chosen.model,
        lr=chosen.lr if lr is None else lr, target=target_accuracy or chosen.target,
        data_dir=str(data_dir) if data_dir else chosen.data_dir)
    try:
        for p in chosen.policies:
            parse_policy(p)
    except ValueError as exc:
        _fail(str(exc))
    known = patterns(chosen.duration_s)
    if straggler is not None:
        rules = {"custom": tuple(straggler)}
    elif unknown := [p for p in chosen.patterns if p not in known]:
        _fail(f"unknown straggler pattern {unknown[0]!r}; choose among {', '.join(known)}")
    else:
        rules = {p: known[p] for p in chosen.patterns}
    if chosen.dataset == "fashion-mnist" and (why := fashion_mnist_missing(chosen.data_dir)) is not None:
        _fail(why)
    bases = {name: base_config(workers, servers, r, chosen.duration_s, chosen.target, chosen.batch_size,
                               chosen.dataset, chosen.model, chosen.lr, chosen.data_dir)
             for name, r in rules.items()}
    try:
        for base in bases.values():
            JobConfig.validate_dict(base)
    except ConfigError as exc:
        _fail(f"config error: {exc}")
    results = run_patterns(out, chosen, bases)
    for name, result in results.items():
        console.print(f"[bold]{name}[/bold]\n" + render_markdown(result), highlight=False)
    console.print(f"results: {out}/results.md; per pattern: {out}/PATTERN/results.md, accuracy.png, "
                  f"time_to_bsp.png, time_split.png, runs/")


@experiment_app.command("failure")
def experiment_failure(
    out: Path = typer.Option(Path("experiments/failure"), help="folder for results, plots and runs"),
    quick: bool = typer.Option(False, "--quick", help="smoke check: 1 seed, 14 s per run, no flush-rule variants"),
    seeds: Optional[int] = typer.Option(None, min=1, help="seeds per configuration (default 3; 1 with --quick)"),
    duration: Optional[float] = typer.Option(None, min=1, help="seconds per run (default 30; 14 with --quick)"),
    strategy: Optional[list[str]] = typer.Option(
        None, "--strategy", help="none | checkpoint | chain/strong | chain/relaxed | stateless or stateless/RULE (repeatable)"),
    kills: Optional[list[int]] = typer.Option(None, "--kills", help="kill counts to run (default 0, 1, 2)"),
    kill_at: Optional[list[float]] = typer.Option(None, "--kill-at", help="seconds of each kill (default 5, 15)"),
    down: Optional[float] = typer.Option(None, min=0, help="seconds a killed server stays down (default 5)"),
    flush_rules: bool = typer.Option(True, help="also run stateless with the sum, staleness, clip and outer rules (1 kill)"),
    workers: int = typer.Option(4, min=1),
    servers: int = typer.Option(2, min=1),
    sync: str = typer.Option("asp", help="sync policy of every run"),
    batch_size: int = typer.Option(64, min=1),
    lr: float = typer.Option(0.05, min=1e-6),
    dataset: str = typer.Option("mnist1d", help="data set of every run"),
    data_dir: Optional[Path] = typer.Option(None, help="folder of local data files (fashion-mnist, mnist, cifar10)"),
    model: str = typer.Option("cnn1d", help="model of every run (papercnn: the seed paper's CNN, 28x28 data)"),
    target_accuracy: float = typer.Option(0.93, min=0.01, max=1.0),
) -> None:
    """Recovery strategies (none, checkpoint, chain strong/relaxed, stateless) under 0, 1, 2 server kills."""
    _writable_dir(out, "--out")
    from .config import ConfigError, JobConfig
    from .experiments.failure import (FLUSH_VARIANTS, FULL, QUICK, STRATEGIES, base_config, kill_rules,
                                      recovery_section, render_markdown, run_failure_experiment)

    preset = QUICK if quick else FULL
    strategies = strategy or STRATEGIES
    kill_at_s = tuple(kill_at or preset["kill_at_s"])
    counts = tuple(kills if kills is not None else (0, 1, 2))
    base = base_config(workers, servers, duration or preset["duration_s"], target_accuracy, batch_size, dataset,
                       model, sync, lr, str(data_dir) if data_dir else None)
    try:
        for s in strategies:
            JobConfig.validate_dict({**base, "recovery": recovery_section(s),
                                     "faults": {"kills": kill_rules(s, max(counts), kill_at_s)}})
    except (ConfigError, ValueError) as exc:
        _fail(f"config error: {exc}")
    variants = FLUSH_VARIANTS if flush_rules and not quick and strategy is None else []
    result = run_failure_experiment(out, strategies, counts, seeds or preset["seeds"], base, kill_at_s,
                                    preset["down_s"] if down is None else down, variants)
    console.print(render_markdown(result["rows"], result), highlight=False)
    console.print(f"results: {out}/results.md, {out}/results.json, {out}/table.json, {out}/accuracy.png")


@experiment_app.command("control")
def experiment_control(
    out: Path = typer.Option(Path("experiments/control"), help="folder for results and runs"),
    seeds: int = typer.Option(3, min=1, help="runs per scenario"),
    duration: float = typer.Option(20.0, min=4, help="seconds of training per run"),
    kill_at: float = typer.Option(8.0, min=0.5, help="seconds into training of the first kill"),
    down: float = typer.Option(2.0, min=0, help="seconds a killed role stays down before its restart"),
    scenario: Optional[list[str]] = typer.Option(
        None, "--scenario", help="coordinator restart | etcd takeover | replica kill | "
                                 "replica kill, coordinator down (repeatable; default all)"),
) -> None:
    """The control plane's failures on the default job: a coordinator restart, an etcd takeover,
    and a replica's removal with the coordinator up and down."""
    _writable_dir(out, "--out")
    from .experiments.control import SCENARIOS, render_markdown, run_control_experiment

    unknown = [s for s in scenario or [] if s not in SCENARIOS]
    if unknown:
        _fail(f"--scenario {unknown[0]!r}: expected one of {', '.join(SCENARIOS)}")
    if kill_at + down + 2 >= duration:
        _fail(f"--duration {duration:g} leaves no training after the kill at {kill_at:g}s and {down:g}s down")
    result = run_control_experiment(out, {"train": {"duration_s": duration}}, seeds, kill_at, down,
                                    tuple(scenario or SCENARIOS))
    console.print(render_markdown(result), highlight=False)
    console.print(f"results: {out}/results.md, {out}/results.json, runs in {out}/runs")


@netlab_app.command("run")
def netlab_run(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML job file"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override a config field: cluster.transport=ltp (repeatable)"),
    rate_mbit: float = typer.Option(1000.0, help="bottleneck rate towards each server"),
    buffer_kb: float = typer.Option(64.0, help="bottleneck queue towards each server"),
    mtu: int = typer.Option(1500, help="MTU of every link"),
) -> None:
    """Run a training job with every server and worker on a host of its own, behind a bottleneck."""
    import yaml

    from .config import ConfigError, JobConfig
    from .netlab import NetLab, NetLabError

    overrides = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep:
            _fail(f"--set {item!r} is not of the form field.path=value")
        overrides[key.strip()] = yaml.safe_load(value)
    try:
        job_config = JobConfig.load(config, overrides)
    except ConfigError as exc:
        _fail(f"config error: {exc}")
    servers = job_config.cluster.servers * job_config.recovery.replicas_per_shard
    try:
        with NetLab(workers=job_config.cluster.workers, servers=servers, rate_mbit=rate_mbit,
                    buffer_kb=buffer_kb, mtu=mtu) as lab:
            job_config.cluster.host = lab.bridge_address
            console.print(f"netlab {lab.subnet}: {servers} server(s) behind {rate_mbit:g} Mbit/s, "
                          f"{buffer_kb:g} KB; {job_config.cluster.workers} workers", highlight=False)
            _run_job(job_config, lab.placement())
            console.print(f"bottleneck: {lab.bottleneck_stats()}", highlight=False)
    except (NetLabError, ValueError) as exc:
        _fail(f"netlab: {exc}")


@netlab_app.command("cleanup")
def netlab_cleanup() -> None:
    """Remove namespaces and links a killed netlab left behind."""
    from .netlab import cleanup_leftovers
    removed = cleanup_leftovers()
    console.print(f"removed {len(removed)}: {' '.join(removed)}" if removed else "nothing to remove")


@experiment_app.command("transport")
def experiment_transport(
    out: Path = typer.Option(Path("experiments/transport"), help="folder for results, plots and runs"),
    quick: bool = typer.Option(False, "--quick", help="smoke check: one rate and buffer, 6 s per run, no parity or fills"),
    rate: Optional[list[float]] = typer.Option(None, "--rate", help="bottleneck rates in Mbit/s (default 100, 500)"),
    buffer: Optional[list[float]] = typer.Option(None, "--buffer", help="bottleneck queues in KB (default 32, 256)"),
    duration: Optional[float] = typer.Option(None, min=1, help="seconds per grid run (default 12)"),
    parity_epochs: Optional[float] = typer.Option(None, min=0, help="epochs of the parity and fill runs (0: skip)"),
    workers: int = typer.Option(8, min=1),
    hidden: int = typer.Option(256, min=1, help="MLP width (256: 78k parameters, 312 KB per push)"),
) -> None:
    """TCP vs LTP, 8 workers into 1 server through an emulated incast bottleneck (needs root)."""
    from .experiments.transport import FULL, QUICK, base_config, render_markdown, run_transport_experiment
    from .netlab import unavailable_reason

    if bad := [v for v in (rate or []) + (buffer or []) if not v > 0]:
        _fail(f"--rate and --buffer must be positive, got {bad[0]:g}")
    if (reason := unavailable_reason()) is not None:
        _fail(f"experiment transport runs inside netlab: {reason}")
    _writable_dir(out, "--out")
    preset = dict(QUICK if quick else FULL)
    preset.update({k: v for k, v in {"rates": tuple(rate or ()), "buffers": tuple(buffer or ()),
                                     "duration_s": duration}.items() if v})
    if parity_epochs is not None:
        preset.update(parity_epochs=parity_epochs, fill_epochs=parity_epochs)
    result = run_transport_experiment(out, preset, base_config(workers, hidden))
    console.print(render_markdown(result["rows"], result), highlight=False)
    console.print(f"results: {out}/results.md, {out}/results.json, {out}/rounds.png")


def _describe(exc: BaseException) -> str:
    """One line for an exception that escaped a command's own checks."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, (UnicodeDecodeError, json.JSONDecodeError)):
        return f"a file could not be read: {exc}"
    text = " ".join(str(exc).split()) or "no message"
    return f"{type(exc).__name__}: {text} (an unexpected error: rerun with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    """The console script: runs a command and returns (or exits with) its status."""
    from .config import ConfigError

    if argv is None:  # the process's own: `kill -USR1 <pid>` prints where every thread of a stuck driver is
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    global DEBUG
    DEBUG = "--debug" in (sys.argv[1:] if argv is None else argv)  # before the parser: its errors too
    try:
        code = app(args=argv, standalone_mode=False, prog_name="stalwart")
    except NoArgsIsHelpError as exc:
        exc.show()  # a command group given no command: its help
        code = 2
    except UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "stalwart"
        _say_error(f"{' '.join(exc.format_message().split())} (see {where} --help)")
        code = exc.exit_code
    except UserError as exc:
        if DEBUG:
            raise
        _say_error(str(exc))
        code = exc.code
    except ConfigError as exc:  # a config a command built from its options, refused
        if DEBUG:
            raise
        _say_error(f"config error: {exc}")
        code = 2
    except typer.Abort:
        _say_error("interrupted")
        code = 130
    except BrokenPipeError:
        code = 1
    except Exception as exc:  # noqa: BLE001: every escape becomes one line unless --debug
        if DEBUG:
            raise
        _say_error(_describe(exc))
        code = 1
    if argv is None:
        sys.exit(code or 0)
    return code or 0


if __name__ == "__main__":
    main()
