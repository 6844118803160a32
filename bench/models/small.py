"""Small convnets: ``test_tiny_cnn`` for the test-suite and the locuslab "small" CIFAR net."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench.core.registry import MODELS
from bench.models.layers import CIFAR10_MEAN, CIFAR10_STD, Normalize, finish


class TinyCNN(nn.Module):
    """Two 3x3 conv layers, 2x2 adaptive pooling, one linear layer (about 6 k parameters);
    works at any input size of 4x4 or more (test_tiny is 16x16, CIFAR 32x32)."""

    def __init__(self, num_classes: int = 10, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.25, 0.25, 0.25), width: int = 16) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.feature_dim = 2 * width * 4
        self.linear = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate latent (N, 8 * width)."""
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(self.normalize(x)))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return F.adaptive_avg_pool2d(x, 2).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


@MODELS.register("test_tiny_cnn")
def test_tiny_cnn(num_classes: int = 10, mean: Sequence[float] = (0.5, 0.5, 0.5),
                  std: Sequence[float] = (0.25, 0.25, 0.25)) -> TinyCNN:
    """A few-thousand-parameter CNN for tests on ``test_tiny`` (trains in seconds on a CPU)."""
    return finish(TinyCNN(num_classes, mean, std), "test_tiny_cnn", num_classes,
                  mean=mean, std=std)


class LocuslabSmallCNN(nn.Module):
    """Wong & Kolter's "small" CIFAR convnet (convex_adversarial, ``cifar_model``):
    Conv(3,16,4,s2,p1)-ReLU-Conv(16,32,4,s2,p1)-ReLU-Flatten-Linear(2048,100)-ReLU-
    Linear(100,classes). ``net`` keeps the original Sequential indices (``0``, ``2``, ``5``,
    ``7``) so the published state dicts load unchanged. 32x32 inputs only."""

    def __init__(self, num_classes: int = 10, mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 8 * 8, 100), nn.ReLU(),
            nn.Linear(100, num_classes))
        self.feature_dim = 100

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate latent (N, 100)."""
        if x.shape[-2:] != (32, 32):
            raise ValueError(f"locuslab_small_cnn takes 32x32 inputs, got {tuple(x.shape[-2:])}")
        return self.net[:7](self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[7](self.features(x))


@MODELS.register("locuslab_small_cnn")
def locuslab_small_cnn(num_classes: int = 10, mean: Sequence[float] = CIFAR10_MEAN,
                       std: Sequence[float] = CIFAR10_STD) -> LocuslabSmallCNN:
    """The locuslab small CIFAR convnet (0.21 M parameters); the pinned
    ``locuslab-cifar-small`` weights use their own normalisation (see pretrained.py)."""
    return finish(LocuslabSmallCNN(num_classes, mean, std), "locuslab_small_cnn", num_classes,
                  mean=mean, std=std)
