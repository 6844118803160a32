"""``test_tiny``: a synthetic, deterministic 10-class dataset, so the fast tests need no files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bench.core.registry import DATASETS
from bench.data.core import DataError, ImageDataset, LabeledImages, LoadRequest, resize_square

#: one colour per class (RGB in [0, 1]); with the stripe angle it identifies the class
_PALETTE = np.array([
    [0.90, 0.20, 0.20], [0.20, 0.80, 0.20], [0.20, 0.30, 0.90], [0.90, 0.85, 0.20],
    [0.80, 0.25, 0.85], [0.20, 0.85, 0.85], [0.95, 0.55, 0.15], [0.55, 0.35, 0.20],
    [0.60, 0.60, 0.60], [0.45, 0.15, 0.55],
])
_SPLIT_SEEDS = {"train": 1234, "test": 5678}


def make_tiny_images(n: int, size: int, seed: int, num_classes: int = 10
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (float32 (n, 3, size, size) in [0, 1]) and labels, class-major, balanced.

    Class ``c``: sinusoidal stripes at angle ``c * 18`` degrees (+- a few degrees, random phase
    and frequency) tinted with the class colour on a random grey background, plus Gaussian
    noise. A small CNN separates the classes in a few seconds; the noise keeps it from being
    trivially perfect, and the images are far from saturated so perturbations matter.
    """
    rng = np.random.default_rng(seed)
    labels = np.sort(np.arange(n) % num_classes)
    angle = labels * (math.pi / num_classes) + rng.normal(0, 0.05, n)
    freq = rng.uniform(2.0, 3.0, n)                 # cycles per image
    phase = rng.uniform(0, 2 * math.pi, n)
    background = rng.uniform(0.3, 0.6, (n, 1, 1, 1))
    contrast = rng.uniform(0.25, 0.4, (n, 1, 1, 1))
    yy, xx = np.meshgrid(np.linspace(-0.5, 0.5, size), np.linspace(-0.5, 0.5, size),
                         indexing="ij")
    proj = (np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy)
    stripes = np.sin(2 * math.pi * freq[:, None, None] * proj + phase[:, None, None])
    colour = _PALETTE[labels % len(_PALETTE)] + rng.normal(0, 0.05, (n, 3))
    images = background + contrast * stripes[:, None] * colour[:, :, None, None]
    images = images + rng.normal(0, 0.06, images.shape)
    return np.clip(images, 0, 1).astype(np.float32), labels.astype(np.int64)


@DATASETS.register("test_tiny")
class TinySynthetic(ImageDataset):
    """Synthetic 3 x 16 x 16 images of 10 classes (oriented, coloured stripes plus noise),
    generated on the fly: ``n_train`` (default 2000) and ``n_test`` (default 500) images, the
    same on every machine. For the fast test-suite; never for reported numbers."""

    name = "test_tiny"
    title = "test_tiny"
    classes = [f"class{c}" for c in range(10)]
    folder_names = classes
    default_resolution = 16
    default_eps = {"linf": 8 / 255, "l2": 0.5}
    source_order = ("synthetic",)

    def __init__(self, resolution: int | None = None, *, n_train: int = 2000,
                 n_test: int = 500) -> None:
        super().__init__(resolution)
        if n_train < 10 or n_test < 10:
            raise DataError(f"test_tiny needs at least 10 images per split, got "
                            f"n_train={n_train}, n_test={n_test}")
        self.n = {"train": int(n_train), "test": int(n_test)}

    def _load_synthetic(self, req: LoadRequest, roots: Sequence[Path],
                        allow_download: bool = False) -> LabeledImages:
        n = self.n[req.split]
        images, labels = make_tiny_images(n, self.default_resolution, _SPLIT_SEEDS[req.split])
        x = torch.from_numpy(images)
        if req.resolution != self.default_resolution:
            x = resize_square((x * 255).round().to(torch.uint8), req.resolution).float() / 255
        pos = np.arange(n) - np.searchsorted(labels, labels)  # position within the class
        ids = [self.sample_id(req.split, int(c), f"{p:04d}")
               for c, p in zip(labels, pos, strict=True)]
        return LabeledImages(x, torch.from_numpy(labels), ids, list(self.classes), self.name,
                             "synthetic", split=req.split)
