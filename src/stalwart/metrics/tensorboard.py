"""The job's scalars as TensorBoard event files (``--tensorboard DIR``)."""

from __future__ import annotations

from pathlib import Path


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise RuntimeError("--tensorboard needs the tensorboard package: "
                               "pip install 'stalwart[tensorboard]'") from exc
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def add(self, elapsed: float, result: dict, train_loss: float | None) -> None:
        step = int(result["version"])
        self.writer.add_scalar("test/accuracy", result["accuracy"], step)
        self.writer.add_scalar("test/loss", result["loss"], step)
        self.writer.add_scalar("time/elapsed_s", elapsed, step)
        if train_loss is not None:
            self.writer.add_scalar("train/loss", train_loss, step)

    def close(self) -> None:
        self.writer.close()
