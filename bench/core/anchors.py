"""Best known classifier robust accuracy per (dataset, threat), for the implausible-detector
check (Tramer 2021's reduction: a detector robust at eps implies a classifier robust at eps/2).

Each table entry is a list of (eps, accuracy) anchors; between anchors the reference is
interpolated linearly, beyond the last one it stays at the last value. Sources:

* CIFAR-10 Linf: RobustBench, Standard WRN-28-10 94.78 clean; TRADES WRN-34-10 53.08 AutoAttack
  at 8/255 (EVALUATION.md's anchors).
* CIFAR-10 L2: RobustBench CIFAR-10 L2 leaderboard, Wang et al. 2023 ("Better diffusion models
  further improve adversarial training", WRN-70-16): 95.54 clean, 84.97 AutoAttack at eps 0.5.
* ImageNet-10 Linf: RobustBench ImageNet Linf leaderboard, Liu et al. 2023 ("A comprehensive
  study on robustness of image classification models", Swin-L): 78.92 clean, 59.56 AutoAttack at
  4/255. [reconstruction] These are 1000-class ImageNet numbers: on the 10-class subset the
  achievable accuracy is higher, so for ImageNet-10 the check is a prompt to look, not proof;
  no published 10-class reference is known to us.
"""

from __future__ import annotations

from typing import Mapping

REFERENCE_ROBUST_ACCURACY: dict[tuple[str, str], list[tuple[float, float]]] = {
    ("cifar10", "linf"): [(0.0, 0.9478), (8 / 255, 0.5308)],
    ("cifar10", "l2"): [(0.0, 0.9554), (0.5, 0.8497)],
    ("imagenet10", "linf"): [(0.0, 0.7892), (4 / 255, 0.5956)],
}


def reference_accuracy(dataset: str, threat: str, eps: float,
                       table: Mapping | None = None) -> float | None:
    anchors = (table or REFERENCE_ROBUST_ACCURACY).get((dataset, threat))
    if not anchors:
        return None
    anchors = sorted(anchors)
    if eps <= anchors[0][0]:
        return anchors[0][1]
    for (e0, a0), (e1, a1) in zip(anchors, anchors[1:]):
        if e0 <= eps <= e1:
            return a0 + (a1 - a0) * (eps - e0) / (e1 - e0)
    return anchors[-1][1]
