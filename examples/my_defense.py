"""An example submission: a small CNN behind a bit-depth reduction (feature squeezing).

This is the kind of file a user writes OUTSIDE the repository and submits with one command
(see ``docs/submitting.md``)::

    robustmatrix submit examples/my_defense.py:BitDepthCNN --dataset test_tiny --n 20 \\
        --suite test --fit-preset tiny --name "Bit-depth CNN" --authors "A. User"

    robustmatrix submit my_defense.py:BitDepthCNN --dataset cifar10 --n 200 --suite quick \\
        --name "Bit-depth CNN" --authors "A. User" --paper https://arxiv.org/abs/1704.01155 \\
        --architecture "4-layer CNN"

What the contract asks of it (``defenses/base.py``), and how this file meets it:

* images in [0, 1] in, logits out, shape (N, num_classes): the normalisation is inside
  :class:`SmallCNN` and there is no final softmax;
* the rounding in :class:`BitDepth` has zero gradient almost everywhere, so it is DECLARED
  non-differentiable: the harness then attacks through it with BPDA instead of reporting the
  robustness that broken gradients fake;
* deterministic, so ``random = False`` (a random transform would set ``random = True`` and get
  EOT);
* trainable: ``fit`` trains the classifier; the harness calls it once, caches the weights by
  content and records their sha256 with every result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defenses.base import Defense, Preprocessor

#: training epochs and images for the harness's fit presets (tiny is for the test-suite)
EPOCHS = {"tiny": 2, "quick": 8, "full": 30}
MAX_IMAGES = {"tiny": 1000}


class BitDepth(Preprocessor):
    """Quantise every pixel to ``bits`` bits (Xu et al., "Feature Squeezing", 2018)."""

    differentiable = False  # round() has zero gradient almost everywhere: use BPDA
    random = False

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        self.levels = 2 ** int(bits) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * self.levels) / self.levels


class SmallCNN(nn.Module):
    """Conv-BN-ReLU x 2, pooling, linear; any image size of 4x4 or more."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1))
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.linear = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std                      # normalisation inside the model
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(F.adaptive_avg_pool2d(x, 2).flatten(1))  # logits, no softmax


class BitDepthCNN(Defense):
    """A small CNN trained on bit-depth-reduced images, evaluated behind the same reduction."""

    trainable = True
    random = False

    def __init__(self, *, dataset: str = "cifar10", bits: int = 4, width: int = 16) -> None:
        from bench.data import dataset_info

        num_classes = dataset_info(dataset).num_classes
        super().__init__(SmallCNN(num_classes, width), preprocessor=BitDepth(bits),
                         num_classes=num_classes)
        self.bits, self.width = int(bits), int(width)

    def fit(self, train, *, preset: str = "quick", device="cpu", progress: bool = True):
        """Adam on the (reduced) training images; seeded, so the weights are reproducible."""
        epochs = EPOCHS.get(preset, EPOCHS["quick"])
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        opt = torch.optim.Adam(self.classifier.parameters(), lr=3e-3)
        images, labels = train.images, train.labels
        if preset in MAX_IMAGES:  # every class: the train split is class-major, so stride
            step = max(1, len(labels) // MAX_IMAGES[preset])
            images, labels = images[::step], labels[::step]
        self.classifier.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(labels), generator=gen).split(128):
                x = self.preprocessor(images[idx].to(device))
                loss = F.cross_entropy(self.classifier(x), labels[idx].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.eval()
        self.fitted = True
        return self

    def config(self) -> dict:
        return {"bits": self.bits, "width": self.width}
