"""Tiny ``test_*`` defenses that live in the real registry so the test-suite iterates over them.

They run on the synthetic ``test_tiny`` dataset (or any dataset) in well under a second. Each is
a deliberately FLAWED or honest reference for the adaptive attacks and the automatic flags:

* ``test_undefended``: an honest, undefended tiny CNN (no flag expected);
* ``test_quantized``: input quantisation (gradient masking: ``torch.round`` has zero gradient;
  declared ``differentiable=False``), broken by BPDA;
* ``test_random_noise``: Gaussian input noise at every forward (declared random), for EOT;
* ``test_softmax``: returns probabilities instead of logits (the probability-output flag);
* ``test_latent``: a hand-built label-driven "semantic autoencoder" preprocessor (an
  intentionally weak latent defense on which the wrong-label latent attack must succeed);
* ``test_detector``: a feature-squeezing detector (softmax change under bit-depth reduction)
  beside the tiny CNN, calibrated at a 5% false-positive rate on held-out clean images.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bench.core.registry import DEFENSES
from defenses.base import Defense, Detector, Preprocessor
from defenses.undefended import Undefended

TINY_CLASSIFIER = "test_tiny_cnn@tiny"


@DEFENSES.register("test_undefended")
def test_undefended(*, dataset: str = "test_tiny", classifier: str = TINY_CLASSIFIER,
                    device: str = "cpu", progress: bool = False) -> Undefended:
    """An honest, undefended tiny CNN (the 'no flag expected' reference)."""
    return Undefended(dataset=dataset, classifier=classifier, device=device, progress=progress)


def _classifier(classifier: str | nn.Module, dataset: str, device: str, progress: bool
                ) -> tuple[nn.Module, str]:
    from bench.models import resolve_classifier

    model, sha = resolve_classifier(classifier, dataset=dataset, device=device, progress=progress)
    return model.eval(), sha


class _ToyDefense(Defense):
    def __init__(self, classifier: nn.Module, sha: str, spec: Any, **kw: Any) -> None:
        super().__init__(classifier, **kw)
        self.classifier_spec = spec if isinstance(spec, str) else type(spec).__name__
        self.classifier_sha256 = sha
        self.toy_options: dict[str, Any] = {}

    def config(self) -> dict[str, Any]:
        return {"classifier": self.classifier_spec, "classifier_sha256": self.classifier_sha256,
                **self.toy_options}


# gradient masking --------------------------------------------------------------------------
class Quantize(Preprocessor):
    """``round(x * (levels - 1)) / (levels - 1)``: zero gradient almost everywhere."""

    differentiable = False

    def __init__(self, levels: int = 8) -> None:
        super().__init__()
        if int(levels) < 2:
            raise ValueError(f"quantisation needs levels >= 2, got {levels}")
        self.levels = int(levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * (self.levels - 1)) / (self.levels - 1)


@DEFENSES.register("test_quantized")
class TestQuantized(_ToyDefense):
    """Input quantisation before the tiny CNN: a gradient-masking toy (BPDA breaks it)."""

    def __init__(self, *, dataset: str = "test_tiny", classifier: str = TINY_CLASSIFIER,
                 levels: int = 8, device: str = "cpu", progress: bool = False) -> None:
        model, sha = _classifier(classifier, dataset, device, progress)
        super().__init__(model, sha, classifier, preprocessor=Quantize(levels))
        self.toy_options = {"levels": int(levels)}


# randomness ----------------------------------------------------------------------------------
class GaussianNoise(Preprocessor):
    """``clip(x + sigma * N(0, 1), 0, 1)`` drawn anew at every forward."""

    random = True

    def __init__(self, sigma: float = 0.1) -> None:
        super().__init__()
        self.sigma = float(sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.sigma * torch.randn_like(x)).clamp(0, 1)


@DEFENSES.register("test_random_noise")
class TestRandomNoise(_ToyDefense):
    """Gaussian input noise before the tiny CNN: a randomised toy (EOT is the adaptive form)."""

    random = True

    def __init__(self, *, dataset: str = "test_tiny", classifier: str = TINY_CLASSIFIER,
                 sigma: float = 0.1, device: str = "cpu", progress: bool = False) -> None:
        model, sha = _classifier(classifier, dataset, device, progress)
        super().__init__(model, sha, classifier, preprocessor=GaussianNoise(sigma))
        self.toy_options = {"sigma": float(sigma)}


# probability outputs -------------------------------------------------------------------------
@DEFENSES.register("test_softmax")
class TestSoftmax(_ToyDefense):
    """The tiny CNN with a softmax on top: returns probabilities, not logits."""

    def __init__(self, *, dataset: str = "test_tiny", classifier: str = TINY_CLASSIFIER,
                 device: str = "cpu", progress: bool = False) -> None:
        model, sha = _classifier(classifier, dataset, device, progress)
        super().__init__(model, sha, classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x).softmax(1)


# detector ------------------------------------------------------------------------------------
class SqueezeDetector(Detector):
    """Feature squeezing (Xu et al. 2018): score = L1 distance between the classifier's softmax
    on ``x`` and on ``x`` quantised to ``levels`` levels (straight-through, so the score has
    gradients). Adversarial points tend to be fragile under squeezing; clean points are not."""

    def __init__(self, classifier: nn.Module, levels: int = 8) -> None:
        super().__init__()
        self.__dict__["_classifier"] = classifier  # the defense's own module, not saved twice
        self.levels = int(levels)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        f = self.__dict__["_classifier"]
        q = torch.round(x * (self.levels - 1)) / (self.levels - 1)
        q = x + (q - x).detach()
        return (f(x).softmax(1) - f(q).softmax(1)).abs().sum(1)


@DEFENSES.register("test_detector")
class TestDetector(_ToyDefense):
    """The tiny CNN plus :class:`SqueezeDetector`, calibrated in ``fit`` at false-positive rate
    ``fpr`` on ``calibration`` held-out clean images (on ``test_tiny``: freshly generated ones,
    because the classifier was trained on the whole train split)."""

    trainable = True

    def __init__(self, *, dataset: str = "test_tiny", classifier: str = TINY_CLASSIFIER,
                 fpr: float = 0.05, calibration: int = 1000, levels: int = 8,
                 device: str = "cpu", progress: bool = False) -> None:
        model, sha = _classifier(classifier, dataset, device, progress)
        super().__init__(model, sha, classifier, detector=SqueezeDetector(model, levels))
        self.dataset = dataset
        self.toy_options = {"fpr": float(fpr), "calibration": int(calibration),
                            "levels": int(levels)}

    def fit(self, train: Any, *, preset: str = "quick", device: str | torch.device = "cpu",
            progress: bool = True) -> "TestDetector":
        n = self.toy_options["calibration"]
        if self.dataset == "test_tiny":
            from bench.data.synthetic import make_tiny_images

            images = torch.from_numpy(make_tiny_images(n, train.images.shape[-1], seed=4242)[0])
        else:
            g = torch.Generator().manual_seed(0)
            images = train.images[torch.randperm(len(train.images), generator=g)[:n]]
        was_training = self.training
        self.eval()  # batch-norm statistics of the classifier, not of the calibration batch
        self.detector.calibrate(images.to(device), self.toy_options["fpr"])
        self.train(was_training)
        self.fitted = True
        return self


# an intentionally weak latent (semantic-autoencoder) defense ---------------------------------
class ColourSemanticAE(nn.Module):
    """A hand-built "semantic autoencoder" whose decoder is DRIVEN by the label, made for the
    ``test_tiny`` images (grey background plus stripes tinted with the class colour):
    ``E(x, y) = [x, code * onehot(y)]``; ``D(z)`` splits ``x`` into its per-channel mean (the
    background) and the rest (the stripes), and repaints the stripes with the colour of the
    label part: ``D(z) = (1 - tint) x + tint (b + s_grey * colour / mean(colour))``. Encoding
    with a wrong label repaints the stripes in the wrong class's colour and moves the latent to
    the wrong class's region, so the wrong-label latent attack MUST succeed on it (its validation
    on an intentionally weak model, Carlini et al. 2019). ``y`` may be indices or probabilities,
    like :class:`defenses.semantic_autoencoder.SemanticAutoencoder`."""

    label_conditioned = True

    def __init__(self, image_shape: tuple[int, int, int], palette: torch.Tensor, *,
                 tint: float = 1.0, code: float = 10.0) -> None:
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.register_buffer("palette", palette.float())
        self.num_classes = int(palette.shape[0])
        self.tint = float(tint)
        self.code = float(code)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            raise ValueError("the semantic encoder needs a label y (indices or probabilities)")
        onehot = (torch.nn.functional.one_hot(y.long(), self.num_classes).float()
                  if y.dim() == 1 else y.float())
        return torch.cat([x.flatten(1), self.code * onehot.to(x.device)], 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        d = int(torch.tensor(self.image_shape).prod())
        x = z[:, :d].view(-1, *self.image_shape)
        w = z[:, d:].clamp_min(0)
        w = w / w.sum(1, keepdim=True).clamp_min(1e-8)
        colour = w @ self.palette  # (N, 3)
        colour = colour / colour.mean(1, keepdim=True).clamp_min(1e-6)
        b = x.mean((2, 3), keepdim=True)
        s_grey = (x - b).mean(1, keepdim=True)
        repainted = b + s_grey * colour[:, :, None, None]
        return ((1 - self.tint) * x + self.tint * repainted).clamp(0, 1)

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.encode(x, y))


class _LabelledReconstruction(nn.Module):
    def __init__(self, ae: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.ae = ae
        self.__dict__["_classifier"] = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ae.reconstruct(x, self.__dict__["_classifier"](x).softmax(1))


class LabelConditionedPreprocessor(Preprocessor):
    """``x -> D(E(x, argmax classifier(x)))`` (argmax: not differentiable; the surrogate uses
    the softmax instead)."""

    differentiable = False

    def __init__(self, ae: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.ae = ae
        self.__dict__["_classifier"] = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y = self.__dict__["_classifier"](x).argmax(1)
        return self.ae.reconstruct(x, y)

    def surrogate(self) -> nn.Module | None:
        return _LabelledReconstruction(self.ae, self.__dict__["_classifier"])


@DEFENSES.register("test_latent")
class TestLatent(_ToyDefense):
    """The tiny CNN behind :class:`ColourSemanticAE` (an intentionally weak latent defense, for
    the wrong-label latent attack's validation and the latent-defense code paths)."""

    def __init__(self, *, dataset: str = "test_tiny", classifier: str = TINY_CLASSIFIER,
                 tint: float = 1.0, code: float = 10.0, device: str = "cpu",
                 progress: bool = False) -> None:
        model, sha = _classifier(classifier, dataset, device, progress)
        from bench.data.synthetic import _PALETTE

        ae = ColourSemanticAE((3, 16, 16) if dataset == "test_tiny" else (3, 32, 32),
                              torch.tensor(_PALETTE), tint=tint, code=code).to(device)
        super().__init__(model, sha, classifier,
                         preprocessor=LabelConditionedPreprocessor(ae, model))
        self.toy_options = {"tint": float(tint), "code": float(code)}

    @property
    def ae(self) -> ColourSemanticAE:
        return self.preprocessor.ae  # type: ignore[union-attr]
