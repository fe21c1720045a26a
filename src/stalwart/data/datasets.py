"""Data sets, as NumPy arrays, and each worker's shard of the training set.

``mnist1d`` (the default) is generated locally by the ``mnist1d`` package and cached;
``digits`` ships with scikit-learn; ``synthetic`` is a seeded teacher-labelled problem
of any size for throughput work; ``mnist``, ``fashion-mnist`` and ``cifar10`` load from
the user's own files under ``data_dir`` and name the missing file if there is none.
Nothing is ever downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


class DatasetError(FileNotFoundError):
    """A data set cannot be loaded; the message says which file or setting is missing."""


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray  # float32, (n, *input_shape)
    y_train: np.ndarray  # int64
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def cache_dir() -> Path:
    return Path(os.environ.get("STALWART_CACHE", Path.home() / ".cache" / "stalwart"))


def _atomic_save(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _mnist1d(samples: int | None, seed: int, **_: object) -> Dataset:
    samples = samples or 10000
    # The generator is deterministic in (samples, seed); cache it, it takes seconds.
    path = cache_dir() / f"mnist1d-{samples}-{seed}.npz"
    if not path.exists():
        from mnist1d.data import get_dataset_args, make_dataset
        args = get_dataset_args()
        args.num_samples, args.seed = samples, seed
        state = np.random.get_state()  # make_dataset reseeds NumPy's global generator
        try:
            d = make_dataset(args)
        finally:
            np.random.set_state(state)
        _atomic_save(path, x=d["x"], y=d["y"], x_test=d["x_test"], y_test=d["y_test"])
    with np.load(path) as d:
        x, y, xt, yt = d["x"], d["y"], d["x_test"], d["y_test"]
    return Dataset("mnist1d", x[:, None, :].astype(np.float32), y.astype(np.int64),
                   xt[:, None, :].astype(np.float32), yt.astype(np.int64), 10)


def _digits(seed: int, **_: object) -> Dataset:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    cut = int(len(y) * 0.8)
    return Dataset("digits", x[:cut], y[:cut], x[cut:], y[cut:], 10)


def _synthetic(samples: int | None, features: int, seed: int, **_: object) -> Dataset:
    """Gaussian inputs labelled by a fixed random two-layer teacher: learnable, any size."""
    samples = samples or 20000
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, features), dtype=np.float32)
    w1 = rng.standard_normal((features, 64), dtype=np.float32) / np.sqrt(features)
    w2 = rng.standard_normal((64, 10), dtype=np.float32)
    y = np.argmax(np.tanh(x @ w1) @ w2, axis=1).astype(np.int64)
    cut = int(samples * 0.8)
    return Dataset("synthetic", x[:cut], y[:cut], x[cut:], y[cut:], 10)


def _need(path: Path, dataset: str) -> Path:
    if path.exists():
        return path
    gz = path.with_name(path.name + ".gz")
    if gz.exists():
        return gz
    raise DatasetError(f"{dataset}: missing {path} (or {gz.name}); place the files there "
                       f"or point --data-dir at them (nothing is downloaded)")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise DatasetError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DatasetError(f"{path} is truncated: {data.size} bytes for shape {tuple(dims)}")
    return data.reshape(dims)


def _idx_dataset(name: str, folder: str) -> Callable[..., Dataset]:
    def load(data_dir: Path | None, **_: object) -> Dataset:
        if data_dir is None:
            raise DatasetError(f"{name}: give --data-dir, a folder holding {folder}/ "
                               f"with the four IDX files (nothing is downloaded)")
        root = Path(data_dir) / folder
        if not root.exists():
            root = Path(data_dir)
        parts = {}
        for key, stem in (("x", "train-images-idx3-ubyte"), ("y", "train-labels-idx1-ubyte"),
                          ("xt", "t10k-images-idx3-ubyte"), ("yt", "t10k-labels-idx1-ubyte")):
            parts[key] = _read_idx(_need(root / stem, name))
        x = (parts["x"].astype(np.float32) / 255.0)[:, None]
        xt = (parts["xt"].astype(np.float32) / 255.0)[:, None]
        return Dataset(name, x, parts["y"].astype(np.int64), xt, parts["yt"].astype(np.int64), 10)
    return load


def _cifar10(data_dir: Path | None, **_: object) -> Dataset:
    if data_dir is None:
        raise DatasetError("cifar10: give --data-dir, a folder holding cifar-10-batches-py/ "
                           "(nothing is downloaded)")
    root = Path(data_dir) / "cifar-10-batches-py"
    if not root.exists():
        root = Path(data_dir)

    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(_need(root / name, "cifar10"), "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return x.astype(np.float32) / 255.0, np.asarray(d[b"labels"], dtype=np.int64)

    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    xt, yt = batch("test_batch")
    return Dataset("cifar10", np.concatenate([b[0] for b in train]),
                   np.concatenate([b[1] for b in train]), xt, yt, 10)


# Where Debian's dataset-fashion-mnist package puts its files: the paper presets' data.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def fashion_mnist_missing(data_dir: Path | str | None = None) -> str | None:
    """Why FashionMNIST cannot be read from ``data_dir`` (default: the Debian package's
    folder), naming the package that provides it; None when the files are there."""
    root = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    for folder in (root / "FashionMNIST/raw", root):
        if any((folder / f"train-images-idx3-ubyte{ext}").exists() for ext in ("", ".gz")):
            return None
    return (f"FashionMNIST is not in {root}: install Debian's dataset-fashion-mnist package "
            f"(its files land in {FASHION_MNIST_DIR}), or point --data-dir at a folder with the four IDX files")


DATASETS: dict[str, Callable[..., Dataset]] = {
    "mnist1d": _mnist1d,
    "digits": _digits,
    "synthetic": _synthetic,
    "mnist": _idx_dataset("mnist", "MNIST/raw"),
    "fashion-mnist": _idx_dataset("fashion-mnist", "FashionMNIST/raw"),
    "cifar10": _cifar10,
}


def load_dataset(name: str, *, seed: int = 0, samples: int | None = None, features: int = 256,
                 data_dir: Path | None = None) -> Dataset:
    try:
        loader = DATASETS[name]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}") from None
    return loader(samples=samples, features=features, seed=seed, data_dir=data_dir)


def shard_indices(n: int, workers: int, index: int, seed: int) -> np.ndarray:
    """Worker ``index``'s disjoint, equal-sized share of ``n`` training examples."""
    order = np.random.default_rng([seed, 0x5EED]).permutation(n)
    per = n // workers
    if per == 0:
        raise DatasetError(f"{n} training examples cannot be shared among {workers} workers")
    return np.sort(order[index * per:(index + 1) * per])


def fingerprint(ds: Dataset) -> str:
    h = hashlib.sha256()
    for a in (ds.x_train, ds.y_train):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]
