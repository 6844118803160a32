"""torchvision's ResNet-18 with a normalising first module and a ``num_classes``-way head.

The parameter names are torchvision's (``conv1``, ``bn1``, ``layer1..4``, ``fc``), so a
torchvision state dict loads (minus ``fc`` when the class count differs). Pooling is adaptive,
so any resolution works; 64 to 224 is the sensible range (below 64 the stem's stride-4
downsampling leaves very little spatial extent).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bench.core.registry import MODELS
from bench.models.layers import IMAGENET_MEAN, IMAGENET_STD, Normalize, finish


class ImageNetResNet(nn.Module):
    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)  # registered first: the first module normalises
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                     "avgpool", "fc"):
            setattr(self, name, getattr(net, name))
        self.feature_dim = self.fc.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate latent (N, 512)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@MODELS.register("resnet18_imagenet")
def resnet18_imagenet(num_classes: int = 10, mean: Sequence[float] = IMAGENET_MEAN,
                      std: Sequence[float] = IMAGENET_STD) -> ImageNetResNet:
    """torchvision ResNet-18 (11.2 M parameters), randomly initialised."""
    from torchvision.models import resnet18 as tv_resnet18  # imported on use: start-up stays light

    model = ImageNetResNet(tv_resnet18(weights=None, num_classes=num_classes), mean, std)
    return finish(model, "resnet18_imagenet", num_classes, mean=mean, std=std)
