"""The live display: every worker's state and every shard's chain in 80 columns, and
plain lines when the output is not a terminal."""

import io

from rich.console import Console

from stalwart.metrics.progress import ClusterView, Progress, ShardView, WorkerView

RESULT = {"accuracy": 0.912, "loss": 0.301, "version": 4321}


def _view(workers: int = 4) -> ClusterView:
    states = ["training", "at barrier", "detached", "restarting", "dead", "finished"]
    return ClusterView(
        [WorkerView(i, states[i % len(states)], clock=100 + i, rate=50.0, loss=0.3,
                    note="in 3s" if states[i % len(states)] == "restarting" else "") for i in range(workers)],
        [ShardView(0, [0, 2, 4], down={2}, version=4321), ShardView(1, [1, 3, 5], version=4300)])


def test_the_terminal_display_shows_each_worker_and_chain_within_80_columns():
    screen = io.StringIO()
    console = Console(file=screen, width=80, force_terminal=True, color_system=None)
    progress = Progress(enabled=False, target=0.9, console=console)  # render() by hand, not live
    progress.update(12.0, RESULT, _view(6), 0.25)
    progress.note(10.5, "kill server 2 (server:2@10s), back in 5s")
    console.print(progress.render())
    lines = screen.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    text = screen.getvalue()
    for state in ("training", "at barrier", "detached", "restarting in 3s", "dead", "finished"):
        assert state in text
    assert "server 0 → server 2 down → server 4" in text
    assert "acc 0.912" in text and "v4321" in text and "10.5s" in text and "kill server 2" in text
    assert "unreadable" not in text
    progress.show(15.0, _view(6))                      # no evaluation since 12.0 s
    screen.truncate(0)
    console.print(progress.render())
    assert "model unreadable since 12.0s" in screen.getvalue()


def test_many_workers_are_counted_by_state_past_the_first_rows():
    screen = io.StringIO()
    console = Console(file=screen, width=80, force_terminal=True, color_system=None)
    progress = Progress(enabled=False, console=console)
    progress.update(1.0, RESULT, _view(40), None)
    console.print(progress.render())
    assert sum(1 for line in screen.getvalue().splitlines() if line.strip().startswith(("1", "2", "3"))) < 20
    assert "..." in screen.getvalue()


def test_without_a_terminal_it_prints_plain_status_and_event_lines():
    screen = io.StringIO()
    console = Console(file=screen, width=80)  # not a terminal
    with Progress(console=console) as progress:
        progress.update(1.0, RESULT, _view(4), None)
        progress.update(2.0, RESULT, _view(4), None)     # within PLAIN_EVERY_S of the last line: no line
        progress.note(2.5, "restart server 2")
        progress.update(7.0, dict(RESULT, version=5000), _view(4), None)
    lines = screen.getvalue().splitlines()
    assert len(lines) == 3 and "\x1b" not in screen.getvalue()
    assert lines[0].startswith("    1.0s  acc 0.912") and "1 training, 1 at barrier, 1 detached" in lines[0]
    assert lines[1] == "    2.5s  restart server 2"
    assert "136 updates/s" in lines[2]   # (5000 - 4321) / 5 s


def test_the_watch_builds_the_view_from_membership_heartbeats_and_the_fault_schedule():
    from types import SimpleNamespace

    from stalwart.config import JobConfig
    from stalwart.launch.watch import ClusterWatch

    config = JobConfig.validate_dict({"cluster": {"workers": 5, "servers": 1}, "sync": {"policy": "bsp"},
                                      "recovery": {"strategy": "chain", "replicas": 3}})
    notes = []
    progress = SimpleNamespace(note=lambda at, text: notes.append((at, text)))
    injector = SimpleNamespace(down={("worker", 3): 12.0, ("worker", 4): float("inf"), ("server", 1): 20.0})
    watch = ClusterWatch(config, progress, injector, finished={2})

    def status(chain, clocks):
        states = ["training", "waiting", "training", "training", "training"]
        members = [{"role": "worker", "index": w, "alive": True,
                    "stats": {"clock": clocks[w], "loss": 0.5, "state": states[w]}} for w in range(5)]
        members += [{"role": "server", "index": i, "alive": i in chain, "stats": {"version": 100 + i}}
                    for i in range(3)]
        return {"members": members, "chains": [chain]}

    watch.view(status([0, 1, 2], [10] * 5), 9.0)
    view = watch.view(status([0, 2], [30] * 5), 10.0)
    assert [(w.state, w.note) for w in view.workers] == [
        ("training", ""), ("at barrier", ""), ("finished", ""), ("restarting", "in 2s"), ("dead", "")]
    assert view.workers[0].rate == 20.0 and view.workers[3].rate is None
    (shard,) = view.shards
    assert shard.servers == [0, 2] and shard.version == 102
    assert (10.0, "shard 0 chain: servers 0, 1, 2 [dim]now[/dim] servers 0, 2") in notes
    assert (9.0, "server 1 [red]down[/red]") in notes     # the injector killed it: down at once
    # A restarted coordinator that has not heard from every server yet knows no chain:
    # that is not a change, and neither is its coming back.
    notes.clear()
    watch.view(status([], [40] * 5), 11.0)
    watch.view(status([0, 2], [50] * 5), 12.0)
    assert not [n for n in notes if "chain" in n[1]]
