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


# ------------------------------------------------------------ the classifier behind a defense
#: classifier names understood besides zoo specs: the shipped ``standard`` adversarially
#: trained models, and the dataset's undefended default
SHIPPED_CLASSIFIER_NAMES = ("pgd_at", "spat")
UNDEFENDED = {"cifar10": "akamaster-resnet20", "imagenet10": "resnet20_s2@standard",
              "test_tiny": "test_tiny_cnn@tiny"}


def behind_classifier(spec: str | nn.Module, *, dataset: str, resolution: int | None = None,
                      device: str = "cpu", progress: bool = False
                      ) -> tuple[nn.Module, str, str]:
    """(classifier in eval mode, sha256, name) for the model behind a purifier or an input
    transform: ``"undefended"`` (the dataset's undefended default: the pinned akamaster
    ResNet-20 on CIFAR-10, the shipped ``resnet20_s2@standard`` on ImageNet-10), ``"pgd_at"`` /
    ``"spat"`` (the classifier of the shipped ``standard`` artifact, sha256-checked), any zoo
    spec (:func:`bench.models.load_classifier`), or a module."""
    from bench.models import resolve_classifier

    if isinstance(spec, str) and spec == "undefended":
        if dataset not in UNDEFENDED:
            raise ValueError(f"no undefended default classifier for {dataset!r}: name one "
                             f"(classifier: <zoo spec>)")
        spec = UNDEFENDED[dataset]
    if isinstance(spec, str) and spec in SHIPPED_CLASSIFIER_NAMES:
        from defenses.spat import dataset_defaults, default_arch, shipped_classifier

        info: dict = {}
        num_classes, _ = dataset_defaults(dataset, resolution)
        model = shipped_classifier(dataset, resolution, default_arch(dataset, "standard"),
                                   num_classes, device, info, defense=spec)
        return model, info["baseline_sha256"], spec
    model, sha = resolve_classifier(spec, dataset=dataset, device=device, progress=progress)
    return model.eval(), sha, spec if isinstance(spec, str) else type(spec).__name__
