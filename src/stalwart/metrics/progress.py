"""The live progress line of a running job (rich), quiet when disabled."""

from __future__ import annotations

from rich.console import Console
from rich.live import Live
from rich.table import Table


class Progress:
    def __init__(self, enabled: bool = True, target: float | None = None):
        self.enabled, self.target = enabled, target
        self._live: Live | None = None
        self._last: tuple[float, int] | None = None
        self._rate = 0.0

    def __enter__(self) -> "Progress":
        if self.enabled:
            self._live = Live(self._render(0.0, None, [], None), console=Console(), refresh_per_second=4)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def update(self, elapsed: float, result: dict, workers: list[dict], train_loss: float | None) -> None:
        if self._last is not None and elapsed > self._last[0] and workers:
            self._rate = (result["version"] - self._last[1]) / (elapsed - self._last[0])
        self._last = (elapsed, result["version"])
        if self._live is not None:
            self._live.update(self._render(elapsed, result, workers, train_loss))

    def _render(self, elapsed: float, result: dict | None, workers: list[dict],
                train_loss: float | None) -> Table:
        table = Table(title="stalwart", expand=False)
        for col in ("time", "clock", "test acc", "test loss", "train loss", "updates/s", "workers"):
            table.add_column(col, justify="right")
        if result is None:
            table.add_row(f"{elapsed:5.1f}s", "-", "-", "-", "-", "-", "starting")
            return table
        acc = f"{result['accuracy']:.3f}"
        if self.target is not None and result["accuracy"] >= self.target:
            acc = f"[green]{acc}[/green]"
        alive = sum(1 for w in workers if w.get("alive"))
        table.add_row(f"{elapsed:5.1f}s", str(result["version"]), acc, f"{result['loss']:.3f}",
                      "-" if train_loss is None else f"{train_loss:.3f}", f"{self._rate:.1f}",
                      f"{alive}/{len(workers)}" if workers else "-")
        return table
