"""The standard attacks, wrapped from the libraries made for them (never re-implemented):
PGD (Linf, L2) and CW (L2) from torchattacks, AutoAttack from pyautoattack.

Registered names: ``pgd``, ``cw``, ``autoattack`` (version standard / rand / plus / cheap),
``autoattack_cheap`` (the CPU configuration), and tiny ``test_pgd`` for the test-suite.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import nn

from attacks.base import Attack, AttackResult
from bench.core.registry import ATTACKS


def _prepare(atk: Any, images: torch.Tensor) -> Any:
    atk.set_device(images.device)
    return atk


@ATTACKS.register("pgd")
class PGD(Attack):
    """Projected gradient descent with random start (Madry et al.), from torchattacks.

    ``rel_stepsize`` is the step size relative to epsilon (foolbox's convention), so the same
    configuration works for every epsilon; default 2.5 / steps (Madry's choice for PGD-40 was
    0.01 at 0.3, i.e. 2.5 * eps / steps).
    """

    threats: ClassVar[tuple[str, ...]] = ("linf", "l2")

    def __init__(self, *, threat: str | None = None, steps: int = 10, restarts: int = 1,
                 rel_stepsize: float | None = None, random_start: bool = True,
                 seed: int = 0) -> None:
        if int(steps) < 1 or int(restarts) < 1:
            raise ValueError(f"PGD needs steps >= 1 and restarts >= 1, got {steps}, {restarts}")
        rel = 2.5 / int(steps) if rel_stepsize is None else float(rel_stepsize)
        super().__init__(threat=threat, seed=seed, steps=int(steps), restarts=int(restarts),
                         rel_stepsize=rel, random_start=bool(random_start))

    def make(self, model: nn.Module, eps: float) -> Any:
        o = self.options
        import torchattacks  # imported when used: a fully cached re-run never needs it

        cls = torchattacks.PGD if self.threat == "linf" else torchattacks.PGDL2
        return cls(model, eps=eps, alpha=o["rel_stepsize"] * eps, steps=o["steps"],
                   random_start=o["random_start"])

    def run(self, model, images, labels, eps, *, seed, context):
        atk = _prepare(self.make(model, eps), images)
        best = images.clone()
        remaining = torch.ones(len(labels), dtype=torch.bool, device=labels.device)
        for _ in range(self.options["restarts"]):
            adv = atk(images, labels)
            with torch.no_grad():
                fooled = model(adv).argmax(1) != labels
            take = remaining & fooled if _ > 0 else torch.ones_like(fooled)
            best[take] = adv[take]
            remaining &= ~fooled
            if not remaining.any():
                break
        return AttackResult(adv=best, iterations=self.options["steps"] * self.options["restarts"])


@ATTACKS.register("cw")
class CW(Attack):
    """Carlini-Wagner L2 (torchattacks; minimal-norm: points beyond eps count as failures)."""

    threats: ClassVar[tuple[str, ...]] = ("l2",)
    minimal_norm: ClassVar[bool] = True
    random: ClassVar[bool] = False

    def __init__(self, *, threat: str | None = None, c: float = 1.0, kappa: float = 0.0,
                 steps: int = 100, lr: float = 0.01, seed: int = 0) -> None:
        super().__init__(threat=threat, seed=seed, c=float(c), kappa=float(kappa),
                         steps=int(steps), lr=float(lr))

    def run(self, model, images, labels, eps, *, seed, context):
        o = self.options
        import torchattacks

        atk = _prepare(torchattacks.CW(model, c=o["c"], kappa=o["kappa"], steps=o["steps"],
                                       lr=o["lr"]), images)
        return AttackResult(adv=atk(images, labels), iterations=o["steps"])


class _LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


AUTOATTACK_CHEAP = {"attacks": ["apgd-ce", "apgd-t"], "n_iter": 20, "n_target_classes": 3}


@ATTACKS.register("autoattack")
class AutoAttack(Attack):
    """AutoAttack (Croce and Hein) through pyautoattack, always seeded.

    ``version``: "standard" (APGD-CE, APGD-T, FAB-T, Square), "rand" (APGD-CE and APGD-DLR with
    EOT over 20 draws, for randomised defenses), "plus", or "cheap": APGD-CE + APGD-T with
    20 iterations and 3 target classes, a CPU configuration that is NOT the reference
    evaluation (the leaderboard names it separately). ``attacks`` selects a custom list.
    The library's log is captured into ``extras['log']`` (its own reliability checks).
    """

    threats: ClassVar[tuple[str, ...]] = ("linf", "l2")

    def __init__(self, *, threat: str | None = None, version: str = "standard",
                 attacks: list[str] | None = None, n_iter: int | None = None,
                 n_target_classes: int | None = None, n_queries: int | None = None,
                 eot_iter: int | None = None, seed: int = 0) -> None:
        if version not in ("standard", "rand", "plus", "cheap", "custom"):
            raise ValueError(f"unknown AutoAttack version {version!r}; use standard, rand, plus, "
                             "cheap or custom")
        if version == "cheap":
            attacks = attacks or AUTOATTACK_CHEAP["attacks"]
            n_iter = n_iter or AUTOATTACK_CHEAP["n_iter"]
            n_target_classes = n_target_classes or AUTOATTACK_CHEAP["n_target_classes"]
        super().__init__(threat=threat, seed=seed, version=version, attacks=attacks,
                         n_iter=n_iter, n_target_classes=n_target_classes, n_queries=n_queries,
                         eot_iter=eot_iter)

    def make(self, model: nn.Module, eps: float, device: torch.device, seed: int) -> Any:
        from pyautoattack import AutoAttack as _AutoAttack

        o = self.options
        norm = {"linf": "Linf", "l2": "L2"}[self.threat]
        version = o["version"]
        custom = version in ("cheap", "custom")
        aa = _AutoAttack(model, norm=norm, eps=eps, seed=seed, device=device,
                         version="custom" if custom else version,
                         attacks=o["attacks"] if custom else None)
        if custom and not o["attacks"]:
            raise ValueError("AutoAttack version 'custom' needs attacks=[...], e.g. ['apgd-ce']")
        if o["n_iter"]:
            aa.apgd.n_iter = aa.apgd_targeted.n_iter = aa.fab.n_iter = o["n_iter"]
        if o["n_target_classes"]:
            aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = o["n_target_classes"]
        if o["n_queries"]:
            aa.square.n_queries = o["n_queries"]
        if o["eot_iter"]:
            aa.apgd.eot_iter = aa.apgd_targeted.eot_iter = o["eot_iter"]
        return aa

    def run(self, model, images, labels, eps, *, seed, context):
        aa = self.make(model, eps, images.device, seed)
        capture = _LogCapture()
        aa.logger.addHandler(capture)
        old_level = aa.logger.level
        aa.logger.setLevel(logging.DEBUG)
        reset_autoattack_dynamic_check()
        try:
            adv, _ = aa.run_standard_evaluation(images, labels, batch_size=len(images))
        finally:
            aa.logger.removeHandler(capture)
            aa.logger.setLevel(old_level)
        return AttackResult(adv=adv, extras={"log": capture.lines})


def reset_autoattack_dynamic_check() -> None:
    """pyautoattack's dynamic-defense check keeps a module-level counter that is never reset;
    reset it per cell so one defense's flag does not leak into the next (EVALUATION.md)."""
    from pyautoattack import checks

    for name in getattr(checks, "funcs", {}):
        checks.funcs[name] = 0


@ATTACKS.register("autoattack_cheap")
def autoattack_cheap(**kwargs: Any) -> AutoAttack:
    """AutoAttack's CPU configuration (APGD-CE + APGD-T, 20 iterations, 3 targets)."""
    return AutoAttack(version="cheap", **kwargs)


@ATTACKS.register("test_pgd")
def test_pgd(**kwargs: Any) -> PGD:
    """A 3-step PGD for the fast test-suite."""
    kwargs.setdefault("steps", 3)
    return PGD(**kwargs)
