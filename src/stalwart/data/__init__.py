"""Data: loading data sets and sharing them out among workers."""

from .datasets import DATASETS, Dataset, DatasetError, load_dataset, shard_indices

__all__ = ["DATASETS", "Dataset", "DatasetError", "load_dataset", "shard_indices"]
