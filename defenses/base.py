"""The defense contract.

A defense maps images in [0, 1] (N, C, H, W) to logits (N, num_classes) and DECLARES its
structure, because the harness chooses adaptive attacks from that declaration
(``../shared/EVALUATION.md``):

* ``classifier``: the bare classifier (always present; used for transfer / gray-box attacks).
* ``preprocessor``: an optional :class:`Preprocessor` (an input transform or purifier) run
  before the classifier. It declares whether autograd through it gives useful gradients
  (``differentiable``), whether it is random, and optionally a differentiable ``surrogate``
  for BPDA.
* ``detector``: an optional :class:`Detector` whose ``score`` is thresholded to reject inputs.
* ``random``: whether two forward passes on the same input may differ.
* trainable parts: ``fit(train, ...)`` plus ``state_dict``/``load_state_dict`` (saved by the
  harness as safetensors with their config and sha256).

A submitted defense only has to subclass :class:`Defense` (or provide the same attributes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from bench.core.hashing import state_dict_sha256


class Preprocessor(nn.Module):
    """An input transform applied before the classifier (purifier, denoiser, quantiser...).

    Subclasses implement ``forward(x) -> x'`` with x' in [0, 1] and the same shape.
    ``differentiable = False`` tells the harness that gradients through ``forward`` are broken
    or meaningless, so it attacks with BPDA (identity backward, or through ``surrogate()``).
    """

    differentiable: bool = True
    random: bool = False

    def surrogate(self) -> nn.Module | None:
        """A differentiable approximation of ``forward`` for BPDA, or None (identity)."""
        return None


class Detector(nn.Module):
    """An adversarial-input detector: ``score(x)`` is higher for more suspicious inputs.

    ``calibrate(clean_images, fpr)`` sets ``threshold`` so that a fraction ``fpr`` of clean
    held-out inputs is rejected. ``flag(x)`` is ``score(x) > threshold``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.fpr: float = 0.05

    def score(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x)

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.threshold))

    @torch.no_grad()
    def calibrate(self, clean_images: torch.Tensor, fpr: float = 0.05,
                  batch_size: int = 256) -> float:
        if not 0.0 < float(fpr) < 1.0:
            raise ValueError(f"false-positive rate must lie in (0, 1), got {fpr}; e.g. fpr=0.05")
        scores = torch.cat([self.score(clean_images[i:i + batch_size]).float().cpu()
                            for i in range(0, len(clean_images), batch_size)])
        self.threshold.fill_(float(torch.quantile(scores, 1.0 - float(fpr))))
        self.fpr = float(fpr)
        return float(self.threshold)

    def flag(self, x: torch.Tensor) -> torch.Tensor:
        if not self.calibrated:
            raise RuntimeError("detector threshold is not set: call calibrate(clean_images, fpr) "
                               "or fit the defense first")
        return self.score(x) > self.threshold


@dataclass(frozen=True)
class DefenseStructure:
    """What the harness needs to know to pick attacks (stored as provenance too)."""

    has_preprocessor: bool
    preprocessor_differentiable: bool
    has_surrogate: bool
    has_detector: bool
    random: bool
    trainable: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class DefenseNotFittedError(RuntimeError):
    pass


class Defense(nn.Module):
    """Base class: images in [0, 1] -> logits, with declared structure.

    The default ``forward`` is ``classifier(preprocessor(x))``. Detector defenses keep
    ``forward`` as the classification path; the harness calls :meth:`detect` separately and
    scores as EVALUATION.md says (clean correct = not flagged AND correct; adversarial
    defended = flagged OR correct).
    """

    #: declared randomness of the whole defense (the preprocessor's is added automatically)
    random: bool = False
    #: whether ``fit`` must be called before use
    trainable: bool = False

    def __init__(self, classifier: nn.Module, preprocessor: Preprocessor | None = None,
                 detector: Detector | None = None, num_classes: int | None = None) -> None:
        super().__init__()
        self.classifier = classifier
        self.preprocessor = preprocessor
        self.detector = detector
        self.num_classes = num_classes or getattr(classifier, "num_classes", None)
        self.fitted = not self.trainable

    # the contract ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.require_fitted()
        if self.preprocessor is not None:
            x = self.preprocessor(x)
        return self.classifier(x)

    def detect(self, x: torch.Tensor) -> torch.Tensor | None:
        """Boolean (N,) rejection mask, or None when the defense has no detector."""
        if self.detector is None:
            return None
        self.require_fitted()
        return self.detector.flag(x)

    @property
    def structure(self) -> DefenseStructure:
        p = self.preprocessor
        return DefenseStructure(
            has_preprocessor=p is not None,
            preprocessor_differentiable=bool(p is None or getattr(p, "differentiable", True)),
            has_surrogate=bool(p is not None and p.surrogate() is not None),
            has_detector=self.detector is not None,
            random=bool(self.random or getattr(p, "random", False)),
            trainable=self.trainable,
        )

    # training --------------------------------------------------------------------------------
    def fit(self, train: Any, *, preset: str = "quick", device: str | torch.device = "cpu",
            progress: bool = True) -> "Defense":
        """Train the trainable parts on ``train`` (a :class:`bench.data.LabeledImages`)."""
        self.fitted = True
        return self

    def config(self) -> dict[str, Any]:
        """JSON-able configuration that determines the trained artifact (used for its key)."""
        return {}

    def require_fitted(self) -> None:
        if not self.fitted:
            raise DefenseNotFittedError(
                f"defense {type(self).__name__} is used before it is fitted: run "
                f"`robustmatrix fit {getattr(self, 'registry_name', type(self).__name__)} "
                f"--dataset ...` or call .fit(train) first")

    def fingerprint(self) -> str:
        """sha256 over the state dict (the checkpoint identity recorded with every cell)."""
        return state_dict_sha256(self)

    def __repr__(self) -> str:  # short, provenance-friendly
        return f"{type(self).__name__}(structure={self.structure.as_dict()})"

