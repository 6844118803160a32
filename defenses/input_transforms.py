"""Input-transformation defenses: the "prior purification" baselines the SRD purifier is
compared with (``../shared/METHODS.md`` section 4; issue 14).

* ``jpeg``: JPEG re-encoding at ``quality`` (Das et al. 2017; Guo et al. 2018), through
  Pillow's libjpeg encoder and decoder (torchvision.io's JPEG codec is deprecated since
  torchvision 0.29). Not differentiable: BPDA.
* ``bit_depth``: each pixel quantised to ``bits`` bits (Xu et al., "Feature Squeezing", 2018).
  Zero gradient almost everywhere: BPDA.
* ``median_filter``: a ``size`` x ``size`` median per channel (Xu et al. 2018), reflect-padded.
  Autograd passes the gradient to the selected pixel, so it is declared differentiable; the
  harness still adds transfer and gradient-free attacks.

Each wraps any classifier (``classifier``: a zoo spec such as ``akamaster-resnet20``, a checkpoint
path or ``"<arch>@<recipe>"``; ``"undefended"``, ``"pgd_at"`` or ``"spat"``, see
:func:`defenses.undefended.behind_classifier`), so the same transform sits in front of the
undefended model and of the adversarially trained ones. All are deterministic and keep outputs
in [0, 1].
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.core.registry import DEFENSES
from defenses.base import Defense, Preprocessor


class JPEG(Preprocessor):
    differentiable = False

    def __init__(self, quality: int = 75) -> None:
        super().__init__()
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"jpeg quality must be in 1..100, got {quality!r}")
        self.quality = int(quality)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import io

        import numpy as np
        from PIL import Image

        u8 = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        out = []
        for img in u8.permute(0, 2, 3, 1).numpy():
            buf = io.BytesIO()
            Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(
                buf, format="JPEG", quality=self.quality)
            dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
            out.append(torch.from_numpy(dec.reshape(img.shape).copy()))
        return torch.stack(out).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255.0


class BitDepth(Preprocessor):
    differentiable = False

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        if not 1 <= int(bits) <= 8:
            raise ValueError(f"bits must be in 1..8, got {bits!r}")
        self.bits = int(bits)
        self.levels = 2 ** int(bits) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x.clamp(0, 1) * self.levels) / self.levels


class MedianFilter(Preprocessor):
    differentiable = True

    def __init__(self, size: int = 3) -> None:
        super().__init__()
        if int(size) < 1 or int(size) % 2 == 0:
            raise ValueError(f"median filter size must be odd and >= 1, got {size!r}")
        self.size = int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        p = self.size // 2
        n, c, h, w = x.shape
        padded = F.pad(x, (p, p, p, p), mode="reflect")
        patches = F.unfold(padded, self.size)  # (n, c*k*k, h*w)
        patches = patches.view(n, c, self.size * self.size, h * w)
        return patches.median(dim=2).values.view(n, c, h, w)


class TransformDefense(Defense):
    """A zoo classifier behind an input transformation."""

    def __init__(self, transform: Preprocessor, *, dataset: str = "cifar10",
                 classifier: str | nn.Module | None = None, preset: str = "quick",
                 device: str = "cpu", progress: bool = False,
                 resolution: int | None = None) -> None:
        from defenses.undefended import behind_classifier, default_arch

        if classifier is None:
            classifier = f"{default_arch(dataset, preset)}@{preset}"
        model, sha, name = behind_classifier(classifier, dataset=dataset, resolution=resolution,
                                             device=device, progress=progress)
        super().__init__(model, preprocessor=transform)
        self.classifier_spec = name
        self.classifier_sha256 = sha

    def config(self) -> dict[str, Any]:
        t = self.preprocessor
        params = {k: getattr(t, k) for k in ("quality", "bits", "size") if hasattr(t, k)}
        return {"classifier": self.classifier_spec, "classifier_sha256": self.classifier_sha256,
                "transform": type(t).__name__, **params}


@DEFENSES.register("jpeg")
def jpeg(*, quality: int = 75, **kwargs: Any) -> TransformDefense:
    """JPEG re-encoding (quality 75) in front of a classifier; attacked with BPDA."""
    return TransformDefense(JPEG(quality), **kwargs)


@DEFENSES.register("bit_depth")
def bit_depth(*, bits: int = 4, **kwargs: Any) -> TransformDefense:
    """Bit-depth reduction (4 bits) in front of a classifier; attacked with BPDA."""
    return TransformDefense(BitDepth(bits), **kwargs)


@DEFENSES.register("median_filter")
def median_filter(*, size: int = 3, **kwargs: Any) -> TransformDefense:
    """A 3 x 3 median filter in front of a classifier."""
    return TransformDefense(MedianFilter(size), **kwargs)


@DEFENSES.register("test_jpeg")
def test_jpeg(**kwargs: Any) -> TransformDefense:
    """JPEG in front of the tiny test classifier (test-suite)."""
    kwargs.setdefault("dataset", "test_tiny")
    kwargs.setdefault("preset", "tiny")
    return jpeg(**kwargs)
