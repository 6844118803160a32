"""CIFAR-10: the local JPEG tree, the 100-image lossless CSV, or torchvision's download."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bench.core.registry import DATASETS
from bench.data.core import DataError, ImageDataset, LabeledImages, LoadRequest, resize_square

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
LOSSLESS_CSV = "cifar10-test-first100-lossless.csv"
TORCHVISION_DIR = "cifar-10-batches-py"


def within_class_positions(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """For each image, how many earlier images (in the given order) share its label."""
    pos = np.zeros(len(labels), dtype=np.int64)
    seen = np.zeros(num_classes, dtype=np.int64)
    for i, c in enumerate(labels):
        pos[i] = seen[c]
        seen[c] += 1
    return pos


@DATASETS.register("cifar10")
class Cifar10(ImageDataset):
    """CIFAR-10 (32x32, 10 classes). ``resolution`` other than 32 resizes (bilinear).

    Sources: ``"jpeg-tree"`` (``<root>/cifar10-jpeg/{train,test}/<class>/NNNN.jpg``, where
    NNNN is the position within its class in the original order; a lossy re-encoding, about
    6/255 mean abs error), ``"lossless-csv"`` (the first 100 test images, bit-exact; only when
    asked for), ``"torchvision"`` (``torchvision.datasets.CIFAR10``, downloaded into
    ``<cache>/data``). Ids are ``cifar10/<split>/<label>/<NNNN>`` from every source.
    """

    name = "cifar10"
    title = "CIFAR-10"
    classes = CIFAR10_CLASSES
    folder_names = CIFAR10_CLASSES
    default_resolution = 32
    native_size = 32
    # RobustBench's CIFAR-10 threat models
    default_eps = {"linf": 8 / 255, "l2": 0.5}
    tree_dirname = "cifar10-jpeg"
    source_order = ("jpeg-tree", "torchvision")

    def _from_arrays(self, hwc: np.ndarray, labels: np.ndarray, req: LoadRequest,
                     source: str) -> LabeledImages:
        """Original-order uint8 (N, 32, 32, 3) + labels -> class-major LabeledImages."""
        labels = np.asarray(labels, dtype=np.int64)
        pos = within_class_positions(labels, len(self.classes))
        order = np.lexsort((pos, labels))
        images = torch.from_numpy(np.ascontiguousarray(hwc[order])).permute(0, 3, 1, 2)
        if req.resolution != 32:
            images = resize_square(images, req.resolution)
        ids = [self.sample_id(req.split, int(labels[i]), f"{pos[i]:04d}") for i in order]
        return self.make(images, torch.from_numpy(labels[order]), ids, source, req.split)

    # -- the lossless CSV -------------------------------------------------------------------
    def _load_lossless_csv(self, req: LoadRequest, roots: Sequence[Path],
                           allow_download: bool = False) -> LabeledImages | None:
        if req.split != "test":
            raise DataError("the lossless CSV holds CIFAR-10 test images only; use "
                            "split='test' or another source")
        for root in roots:
            path = root if root.is_file() else root / LOSSLESS_CSV
            if path.is_file():
                return self._from_arrays(*read_lossless_csv(path), req, "lossless-csv")
        return None

    # -- torchvision ------------------------------------------------------------------------
    def _load_torchvision(self, req: LoadRequest, roots: Sequence[Path],
                          allow_download: bool = False) -> LabeledImages | None:
        from torchvision.datasets import CIFAR10

        found = next((r for r in roots if (r / TORCHVISION_DIR).is_dir()), None)
        if found is None and not allow_download:
            return None
        target = found if found is not None else req.cache_root / "data"
        try:
            tv = CIFAR10(str(target), train=req.split == "train", download=found is None)
        except Exception as exc:  # noqa: BLE001 - network or archive errors become one line
            raise DataError(f"could not {'read' if found else 'download'} CIFAR-10 with "
                            f"torchvision into {target} ({type(exc).__name__}: {exc}); pass "
                            f"--data-root PATH or set ROBUSTMATRIX_DATA") from exc
        return self._from_arrays(np.asarray(tv.data), np.asarray(tv.targets), req, "torchvision")


def read_lossless_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, 32, 32, 3), int64 labels) in row order from the lossless CSV."""
    try:
        rows = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise DataError(f"cannot parse {path} ({exc}); expected rows of 3073 ints") from exc
    if rows.shape[1] != 3073 or rows[:, 1:].min() < 0 or rows[:, 1:].max() > 255 \
            or rows[:, 0].min() < 0 or rows[:, 0].max() > 9:
        raise DataError(f"{path} is not the CIFAR-10 lossless CSV (rows of label + 3072 uint8 "
                        f"values expected, got shape {rows.shape})")
    return rows[:, 1:].astype(np.uint8).reshape(-1, 32, 32, 3), rows[:, 0]
