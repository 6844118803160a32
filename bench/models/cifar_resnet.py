"""He et al. (2016) CIFAR ResNets with "option A" (zero-padding, parameter-free) shortcuts.

The parameter layout is exactly that of akamaster/pytorch_resnet_cifar10 (``conv1``, ``bn1``,
``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``, ``linear``), so its published weights load after
stripping the ``module.`` prefix; the only extra entries are ``normalize.mean``/``std``.
Global average pooling is adaptive, so any input size works (32x32 is the native one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench.core.registry import MODELS
from bench.models.layers import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    finish,
)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # option A: subsample by 2 and zero-pad the new channels (no parameters)
        self.pad_channels = planes - in_planes if (stride != 1 or in_planes != planes) else 0
        self.stride = stride

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad_channels == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        half = self.pad_channels // 2
        return F.pad(x, (0, 0, 0, 0, half, self.pad_channels - half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3 stages of ``depth`` = 6n+2 layers, widths 16/32/64 times ``width``; ``stem_stride`` 2
    halves the resolution in the first convolution (64 px inputs cost what 32 px ones do)."""

    def __init__(self, depth: int, num_classes: int = 10,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD,
                 width: int = 1, stem_stride: int = 1) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.normalize = Normalize(mean, std)
        w = 16 * int(width)
        self.in_planes = w
        self.conv1 = nn.Conv2d(3, w, 3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.layer1 = self._make_layer(w, n, 1)
        self.layer2 = self._make_layer(2 * w, n, 2)
        self.layer3 = self._make_layer(4 * w, n, 2)
        self.linear = nn.Linear(4 * w, num_classes)
        self.feature_dim = 4 * w
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate latent (N, 64 x width): pooled activations before ``linear``."""
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


@MODELS.register("resnet20")
def resnet20(num_classes: int = 10, mean: Sequence[float] = CIFAR10_MEAN,
             std: Sequence[float] = CIFAR10_STD) -> CifarResNet:
    """ResNet-20 (0.27 M parameters)."""
    return finish(CifarResNet(20, num_classes, mean, std), "resnet20", num_classes,
                  mean=mean, std=std)


@MODELS.register("resnet56")
def resnet56(num_classes: int = 10, mean: Sequence[float] = CIFAR10_MEAN,
             std: Sequence[float] = CIFAR10_STD) -> CifarResNet:
    """ResNet-56 (0.85 M parameters)."""
    return finish(CifarResNet(56, num_classes, mean, std), "resnet56", num_classes,
                  mean=mean, std=std)


@MODELS.register("resnet20_w2")
def resnet20_w2(num_classes: int = 10, mean: Sequence[float] = CIFAR10_MEAN,
                std: Sequence[float] = CIFAR10_STD) -> CifarResNet:
    """ResNet-20 at twice the width (32/64/128 channels, 1.1 M parameters): the `standard`
    adversarial-training architecture (wider nets gain more from adversarial training)."""
    return finish(CifarResNet(20, num_classes, mean, std, width=2), "resnet20_w2", num_classes,
                  mean=mean, std=std)


@MODELS.register("resnet20_s2")
def resnet20_s2(num_classes: int = 10, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> CifarResNet:
    """ResNet-20 with a stride-2 stem (0.27 M parameters) for 64 px ImageNet-10: the `standard`
    adversarial-training architecture there (the compute of ResNet-20 at 32 px)."""
    return finish(CifarResNet(20, num_classes, mean, std, stem_stride=2), "resnet20_s2",
                  num_classes, mean=mean, std=std)
