"""Datasets behind one interface (``docs/architecture.md``).

``load_split`` / ``load_eval`` / ``load_train`` return :class:`LabeledImages`;
``dataset_info`` describes a dataset without loading it. Builtin entries of
``bench.core.registry.DATASETS``: ``cifar10``, ``imagenet10`` and the synthetic ``test_tiny``.
"""

from bench.data import cifar10, imagenet10, synthetic  # noqa: F401  (importing registers them)
from bench.data.core import (
    DataError,
    DatasetInfo,
    ImageDataset,
    LabeledImages,
    balanced_indices,
    compute_fingerprint,
    dataset_info,
    get_dataset,
    load_eval,
    load_split,
    load_train,
)

__all__ = [
    "DataError",
    "DatasetInfo",
    "ImageDataset",
    "LabeledImages",
    "balanced_indices",
    "compute_fingerprint",
    "dataset_info",
    "get_dataset",
    "load_eval",
    "load_split",
    "load_train",
]
