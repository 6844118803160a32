"""Shared building blocks: the input normalisation every zoo model starts with.

Every zoo model takes images in [0, 1]; its FIRST module is :class:`Normalize`, so attacks and
defenses never need to know a model's input statistics. The mean and std are persistent
buffers, so a checkpoint carries them and a loaded model normalises exactly as it was trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; a single float broadcasts over all channels."""

    def __init__(self, mean: Sequence[float] | float, std: Sequence[float] | float) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean_t.numel() != std_t.numel() and 1 not in (mean_t.numel(), std_t.numel()):
            raise ValueError(f"mean has {mean_t.numel()} channels, std {std_t.numel()}")
        if (std_t <= 0).any():
            raise ValueError(f"std must be positive, got {std_t.tolist()}")
        n = max(mean_t.numel(), std_t.numel())
        self.register_buffer("mean", mean_t.expand(n).clone().reshape(1, n, 1, 1))
        self.register_buffer("std", std_t.expand(n).clone().reshape(1, n, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def as_floats(values: Sequence[float] | float) -> list[float]:
    """A JSON-friendly list of floats (checkpoint configs store the normalisation)."""
    return [float(v) for v in torch.as_tensor(values, dtype=torch.float64).reshape(-1).tolist()]


def finish(model: nn.Module, arch: str, num_classes: int, **arch_kwargs: Any) -> nn.Module:
    """Attach the metadata every zoo model carries: ``arch``, ``arch_kwargs`` (what
    :func:`bench.core.registry.create_model` needs, besides ``num_classes``, to rebuild it) and
    ``num_classes``."""
    model.arch = arch
    model.num_classes = int(num_classes)
    model.arch_kwargs = {k: (as_floats(v) if k in ("mean", "std") else v)
                         for k, v in arch_kwargs.items()}
    return model
