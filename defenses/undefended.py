"""The baseline: a zoo classifier with no defense."""

from __future__ import annotations

from torch import nn

from bench.core.registry import DEFENSES
from defenses.base import Defense


@DEFENSES.register("undefended")
class Undefended(Defense):
    """Any zoo classifier, undefended. ``classifier`` is a spec for
    :func:`bench.models.load_classifier` (e.g. ``akamaster-resnet20``, ``resnet20@quick``) or an
    ``nn.Module``."""

    def __init__(self, *, dataset: str = "cifar10", classifier: str | nn.Module | None = None,
                 preset: str = "quick", device: str = "cpu", progress: bool = False) -> None:
        from bench.models import resolve_classifier

        if classifier is None:
            classifier = f"{default_arch(dataset, preset)}@{preset}"
        model, sha = resolve_classifier(classifier, dataset=dataset, device=device,
                                        progress=progress)
        super().__init__(model)
        self.classifier_spec = (classifier if isinstance(classifier, str)
                                else type(classifier).__name__)
        self.classifier_sha256 = sha

    def config(self) -> dict:
        return {"classifier": self.classifier_spec, "classifier_sha256": self.classifier_sha256}


DEFAULT_ARCH = {"cifar10": "resnet20", "imagenet10": "resnet18_imagenet",
                "test_tiny": "test_tiny_cnn"}

#: per-(dataset, preset) architectures: ImageNet-10's ``standard`` classifier is the stride-2
#: ResNet-20 of the shipped adversarially trained ImageNet-10 models, trained by the zoo's
#: ``standard`` recipe and shipped (``bench.models.zoo.SHIPPED``)
PRESET_ARCH = {("imagenet10", "standard"): "resnet20_s2"}


def default_arch(dataset: str, preset: str | None = None) -> str:
    """The zoo architecture a defense uses on ``dataset`` (at ``preset``) when none is given."""
    return PRESET_ARCH.get((dataset, preset), DEFAULT_ARCH.get(dataset, "resnet20"))
