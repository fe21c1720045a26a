"""The live view of a running job: the model's progress and what each role is doing.

The driver hands :class:`Progress` one :class:`ClusterView` per evaluation (built from
the coordinator's membership, the workers' heartbeats and the fault injector) and a
line per fault or recovery as it happens. On a terminal that is a rich live display
that fits 80 columns:

* a header: time, the servers' version, test accuracy and loss, updates/s;
* one row per worker: its state (training, waiting at a barrier or on its server,
  detached and training locally, dead, restarting, finished), iteration and rate;
* one row per shard: its server, or its chain head to tail, each marked down when it
  is, and the shard's version;
* the last faults and recoveries, with their times.

When the output is not a terminal (a log file, CI) the same goes out as plain lines:
one status line every few seconds and one line per event, so that a log reads in
order without control characters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

#: the states a worker is shown in, with their colours
WORKER_STATES = {"training": "green", "at barrier": "yellow", "waiting": "yellow", "detached": "cyan",
                 "dead": "red", "restarting": "magenta", "finished": "dim", "starting": "dim"}
MAX_WORKER_ROWS = 12     # more workers than this: the first ones, and a count per state
PLAIN_EVERY_S = 5.0      # status lines when the output is not a terminal
EVENTS_SHOWN = 5


@dataclass
class WorkerView:
    index: int
    state: str
    clock: int | None = None
    rate: float | None = None   # iterations per second since the last view
    loss: float | None = None
    note: str = ""              # e.g. "in 3s" for a restart


@dataclass
class ShardView:
    shard: int
    servers: list[int]              # its chain, head first (one server without chains)
    down: set[int] = field(default_factory=set)
    version: int | None = None


@dataclass
class ClusterView:
    workers: list[WorkerView] = field(default_factory=list)
    shards: list[ShardView] = field(default_factory=list)


class Progress:
    def __init__(self, enabled: bool = True, target: float | None = None, console: Console | None = None):
        self.enabled, self.target = enabled, target
        self.console = console or Console()
        self._live: Live | None = None
        self._last: tuple[float, int] | None = None
        self._rate = 0.0
        self._events: list[tuple[float, str]] = []
        self._state: tuple = (0.0, None, ClusterView(), None)
        self._plain_at = -PLAIN_EVERY_S

    def __enter__(self) -> "Progress":
        if self.enabled and self.console.is_terminal:
            self._live = Live(self.render(), console=self.console, refresh_per_second=4)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    # --- what the driver reports -----------------------------------------------------
    def update(self, elapsed: float, result: dict, view: ClusterView, train_loss: float | None) -> None:
        if self._last is not None and elapsed > self._last[0]:
            self._rate = (result["version"] - self._last[1]) / (elapsed - self._last[0])
        self._last = (elapsed, result["version"])
        self._state = (elapsed, result, view, train_loss)
        if self._live is not None:
            self._live.update(self.render())
        elif self.enabled and elapsed - self._plain_at >= PLAIN_EVERY_S:
            self._plain_at = elapsed
            self.console.print(self.status_line(), highlight=False, soft_wrap=True)

    def show(self, elapsed: float, view: ClusterView) -> None:
        """A new view of the cluster without a new evaluation (the model cannot be read)."""
        _, result, _, train_loss = self._state
        self._state = (elapsed, result, view, train_loss)
        if self._live is not None:
            self._live.update(self.render())

    def note(self, elapsed: float, text: str) -> None:
        """A fault or a recovery, as it happens."""
        self._events.append((elapsed, text))
        del self._events[:-50]
        if self._live is not None:
            self._live.update(self.render())
        elif self.enabled:
            self.console.print(f"{elapsed:7.1f}s  {text}", highlight=False, soft_wrap=True)

    # --- rendering ------------------------------------------------------------------
    def status_line(self) -> str:
        elapsed, result, view, train_loss = self._state
        if result is None:
            return f"{elapsed:7.1f}s  starting"
        counts: dict[str, int] = {}
        for w in view.workers:
            counts[w.state] = counts.get(w.state, 0) + 1
        workers = ", ".join(f"{n} {state}" for state, n in counts.items()) or "-"
        return (f"{elapsed:7.1f}s  acc {result['accuracy']:.3f}  loss {result['loss']:.3f}  "
                f"version {result['version']}  {self._rate:.0f} updates/s  workers: {workers}")

    def render(self) -> Group:
        elapsed, result, view, train_loss = self._state
        head = Table.grid(padding=(0, 2))
        if result is None:
            head.add_row(f"stalwart  {elapsed:5.1f}s", "starting")
            return Group(head)
        acc = Text(f"acc {result['accuracy']:.3f}",
                   style="green" if self.target is not None and result["accuracy"] >= self.target else "")
        head.add_row(Text(f"stalwart {elapsed:6.1f}s", style="bold"), acc, f"loss {result['loss']:.3f}",
                     "train " + ("-" if train_loss is None else f"{train_loss:.3f}"),
                     f"v{result['version']}", f"{self._rate:.0f} upd/s")
        parts = [head]
        if self._last is not None and elapsed - self._last[0] > 1.5:  # show() since: no evaluation
            parts.append(Text(f" model unreadable since {self._last[0]:.1f}s (a server is down): "
                              f"accuracy is from then", style="yellow", overflow="ellipsis", no_wrap=True))
        parts += [self._workers_table(view.workers), self._shards_table(view.shards)]
        if self._events:
            events = Table.grid(padding=(0, 1))
            for at, text in self._events[-EVENTS_SHOWN:]:
                events.add_row(Text(f"{at:6.1f}s", style="dim"), text)
            parts.append(events)
        return Group(*parts)

    @staticmethod
    def _workers_table(workers: list[WorkerView]) -> Group:
        table = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
        for col, justify in (("worker", "right"), ("state", "left"), ("iter", "right"), ("it/s", "right"),
                             ("loss", "right")):
            table.add_column(col, justify=justify, no_wrap=True)
        for w in workers[:MAX_WORKER_ROWS]:
            table.add_row(str(w.index), Text(f"{w.state} {w.note}".strip(), style=WORKER_STATES.get(w.state, "")),
                          "-" if w.clock is None else str(w.clock), "-" if w.rate is None else f"{w.rate:.0f}",
                          "-" if w.loss is None else f"{w.loss:.3f}")
        if len(workers) <= MAX_WORKER_ROWS:
            return Group(table)
        rest: dict[str, int] = {}
        for w in workers[MAX_WORKER_ROWS:]:
            rest[w.state] = rest.get(w.state, 0) + 1
        more = Text(f" ... {len(workers) - MAX_WORKER_ROWS} more: " + ", ".join(f"{n} {s}" for s, n in rest.items()),
                    overflow="ellipsis", no_wrap=True)
        return Group(table, more)

    @staticmethod
    def _shards_table(shards: list[ShardView]) -> Table:
        table = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
        table.add_column("shard", justify="right", no_wrap=True)
        table.add_column("servers (head → tail)", no_wrap=True, overflow="ellipsis", max_width=56)
        table.add_column("version", justify="right", no_wrap=True)
        for s in shards:
            chain = Text()
            for i, index in enumerate(s.servers):
                if i:
                    chain.append(" → ", style="dim")
                chain.append(f"server {index}" + (" down" if index in s.down else ""),
                             style="red" if index in s.down else "")
            if not s.servers:
                chain.append("no server", style="red")
            table.add_row(str(s.shard), chain, "-" if s.version is None else str(s.version))
        return table
