"""Adaptive attacks, chosen from the defense's declared structure (EVALUATION.md, "Adaptive
attacks are chosen from the defense's structure"; Athalye, Carlini and Wagner 2018; Tramer et al.
2020; Carlini and Wagner 2017 for detectors).

Everything here is a MODEL VIEW (an ``nn.Module`` that looks like a classifier) handed to the
existing library attacks of ``attacks/standard.py`` (torchattacks PGD, pyautoattack APGD), so the
attack loops stay the libraries' own; only the detector-aware attack needs its own loop.

Views
  * :class:`BPDAView`: forward through the REAL preprocessor/purifier, backward as identity or
    through ``preprocessor.surrogate()``: ``classifier(s(x) + (P(x) - s(x)).detach())``.
  * :class:`EOTView`: the mean of the log-probabilities over ``draws`` forward passes of a
    random defense, so one backward averages the gradients over the draws (expectation over
    transformation; the CE loss of the view equals the mean CE over draws up to a term that
    vanishes when the draws agree).
  * :class:`RejectClassView`: the detector folded into the classifier as an extra "reject"
    logit ``r = max_j z_j + gamma * (score - threshold) / spread`` (so ``r`` wins exactly when
    the detector flags); with the batch's labels the reject logit is merged into the TRUE
    class (``logsumexp(z_y, r)``), so cross-entropy on the view is ``-log P(defended)`` and an
    untargeted torchattacks PGD on it searches for inputs that are misclassified AND unflagged.

Registered attacks (``bench.core.registry.ATTACKS``)
  * ``adaptive``: an inner attack (default ``pgd``) on the view stack chosen from the defense at
    call time (BPDA if the preprocessor is not differentiable, EOT if the defense is random,
    reject class if it has a detector); ``bpda``, ``eot``, ``bpda_eot``, ``reject_class_pgd``
    are the same with fixed choices.
  * ``transfer``: craft on the bare classifier (``defense.classifier``), evaluate on the defense
    (the gray-box number).
  * ``detector_aware_pgd``: own PGD loop on ``classifier loss - weight * max(0, (score -
    threshold) / spread + margin)``; records its loss trace and returns its BEST iterate.
  * ``square``: the Square black-box attack (pyautoattack, custom version).
  * AutoAttack's ``rand`` version is ``autoattack`` with ``version: rand`` (standard.py).

Which of these a defense gets is the harness's policy (``bench/harness/adaptive_policy.py``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import Attack, AttackResult, AttackTracer
from bench.core.registry import ATTACKS

#: names that are themselves adaptive (never used as an inner attack)
ADAPTIVE_NAMES = ("adaptive", "bpda", "eot", "bpda_eot", "reject_class_pgd", "transfer",
                  "detector_aware_pgd")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The defense under the harness's tracers and our views."""
    while isinstance(model, (AttackTracer, _View)):
        model = model._modules["model"]
    return model


def structure_of(defense: Any) -> dict[str, Any]:
    s = getattr(defense, "structure", None)
    if s is None:
        return {"has_preprocessor": False, "preprocessor_differentiable": True,
                "has_surrogate": False, "has_detector": False, "random": False,
                "trainable": False}
    return s.as_dict() if hasattr(s, "as_dict") else dict(s)


@torch.no_grad()
def looks_random(model: nn.Module, x: torch.Tensor, n: int = 8, tol: float = 1e-4) -> bool:
    """Two forward passes on the same inputs differ (undeclared randomness)."""
    x = x[:n]
    return bool((model(x).float() - model(x).float()).abs().max() > tol)


class _View(nn.Module):
    """A classifier-like wrapper of ``model``; ``passes`` = underlying forwards per call."""

    passes: int = 1

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # a new Module starts in training mode; take the model's mode WITHOUT propagating it,
        # else an attack's eval()/train(previous) round trip would put the defense in training
        # mode (BatchNorm statistics would then change during the attack)
        self.training = model.training

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)


class BPDAView(_View):
    """Forward: the real defense ``classifier(P(x))``; backward: through ``s(x)``, the
    preprocessor's ``surrogate()`` (``surrogate="auto"`` when it has one) or the identity.
    Value equal to the real forward, so success is judged on the real defense."""

    def __init__(self, defense: nn.Module, surrogate: str = "auto") -> None:
        super().__init__(defense)
        pre = getattr(defense, "preprocessor", None)
        if pre is None:
            raise ValueError(f"BPDA needs a defense with a preprocessor; "
                             f"{type(defense).__name__} has none (attack it directly)")
        if surrogate not in ("auto", "identity"):
            raise ValueError(f"surrogate must be 'auto' or 'identity', got {surrogate!r}")
        sur = pre.surrogate() if surrogate == "auto" else None
        self.__dict__["_surrogate"] = sur  # not a submodule: its weights are the defense's
        self.surrogate_kind = "surrogate" if sur is not None else "identity"

    def surrogate_forward(self, x: torch.Tensor) -> torch.Tensor:
        sur = self.__dict__["_surrogate"]
        return sur(x) if sur is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.model
        with torch.no_grad():
            p = d.preprocessor(x)
        s = self.surrogate_forward(x)
        return d.classifier(s + (p - s).detach())

    @torch.no_grad()
    def surrogate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The differentiable approximation's own output: classifier(s(x))."""
        return self.model.classifier(self.surrogate_forward(x))


class EOTView(_View):
    """Mean of ``log_softmax`` over ``draws`` forwards (gradient averaged over the draws)."""

    def __init__(self, model: nn.Module, draws: int) -> None:
        super().__init__(model)
        if int(draws) < 1:
            raise ValueError(f"EOT needs draws >= 1, got {draws}")
        self.draws = int(draws)
        self.passes = self.draws

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [F.log_softmax(self.model(x).float(), dim=1) for _ in range(self.draws)]
        return torch.stack(outs).mean(0)


class RejectClassView(_View):
    """The detector as an extra "reject" logit (see the module docstring)."""

    def __init__(self, model: nn.Module, detector: nn.Module, *, spread: float = 1.0,
                 gamma: float = 1.0, labels: torch.Tensor | None = None) -> None:
        super().__init__(model)
        if not getattr(detector, "calibrated", True):
            raise ValueError("the detector's threshold is not set: fit or calibrate it first")
        self.__dict__["_detector"] = detector
        self.spread = float(spread)
        self.gamma = float(gamma)
        self.labels = labels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x).float()
        det = self.__dict__["_detector"]
        s = det.score(x).float().view(-1)
        r = z.max(1).values + self.gamma * (s - det.threshold.float()) / self.spread
        y = self.labels
        if y is not None and len(y) == len(x):
            zy = z.gather(1, y.view(-1, 1))
            merged = torch.logsumexp(torch.cat([zy, r.view(-1, 1)], 1), dim=1, keepdim=True)
            return z.scatter(1, y.view(-1, 1), merged)
        return torch.cat([z, r.view(-1, 1)], 1)


def _clean_spread(detector: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        s = detector.score(x).float().view(-1)
    sd = float(s.std()) if len(s) > 1 else 0.0
    return sd if sd > 1e-6 else 1.0


def _resolve_choices(defense: nn.Module, images: torch.Tensor, bpda: Any, eot: Any,
                     detector: str, eot_draws: int) -> tuple[bool, int, bool]:
    s = structure_of(defense)
    nondiff = s["has_preprocessor"] and not s["preprocessor_differentiable"]
    use_bpda = nondiff if bpda == "auto" else bool(bpda)
    if eot == "auto":
        rnd = s["random"] or looks_random(defense, images)
        draws = int(eot_draws) if rnd else 0
    else:
        draws = int(eot or 0)
    if detector not in ("auto", "ignore", "reject-class"):
        raise ValueError(f"detector must be 'auto', 'ignore' or 'reject-class', got {detector!r}")
    use_reject = (detector == "reject-class" or (detector == "auto" and s["has_detector"]))
    if use_reject and getattr(defense, "detector", None) is None:
        raise ValueError(f"{type(defense).__name__} has no detector for the reject-class view")
    return use_bpda, draws, use_reject


def build_view(defense: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, *,
               bpda: bool, eot_draws: int, reject: bool, surrogate: str = "auto",
               gamma: float = 1.0) -> tuple[nn.Module, dict[str, Any]]:
    """Stack the views: BPDA (innermost), reject class, EOT (outermost)."""
    info: dict[str, Any] = {"bpda": None, "eot_draws": 0, "reject_class": False}
    view: nn.Module = defense
    if bpda:
        view = BPDAView(defense, surrogate)
        info["bpda"] = view.surrogate_kind
        _check_bpda_consistent(defense, view, images)
    if reject:
        det = defense.detector
        view = RejectClassView(view, det,
                               spread=_clean_spread(det, images), gamma=gamma, labels=labels)
        info["reject_class"] = True
    if eot_draws and eot_draws > 1:
        view = EOTView(view, eot_draws)
        info["eot_draws"] = int(eot_draws)
    info["passes_per_call"] = int(eot_draws) if eot_draws and eot_draws > 1 else 1
    return view, info


@torch.no_grad()
def _check_bpda_consistent(defense: nn.Module, view: BPDAView, x: torch.Tensor) -> None:
    """BPDA rebuilds the forward as classifier(preprocessor(x)); refuse defenses whose own
    forward is something else (checked on a few inputs when the defense is deterministic)."""
    if structure_of(defense)["random"]:
        return
    xs = x[:4]
    a, b = defense(xs).float(), view(xs).float()
    if a.shape != b.shape or (a - b).abs().max() > 1e-3 * (1 + a.abs().max()):
        raise ValueError(f"{type(defense).__name__}.forward is not classifier(preprocessor(x)), "
                         "so BPDA cannot be built from its declared structure; give it a "
                         "preprocessor that is the whole input transform")


def _inner_attack(name: str, options: Mapping[str, Any] | None, threat: str, seed: int) -> Attack:
    if name in ADAPTIVE_NAMES:
        raise ValueError(f"inner attack {name!r} is itself adaptive; use a base attack such as "
                         "pgd or autoattack")
    opts = dict(options or {})
    opts.pop("threat", None)
    return ATTACKS.create(name, threat=threat, seed=seed, **opts)


def _scale_passes(res: AttackResult, k: int) -> AttackResult:
    res.forward_passes *= k
    res.backward_passes *= k
    return res


# ----------------------------------------------------------------------------------------------
# attacks
# ----------------------------------------------------------------------------------------------
@ATTACKS.register("adaptive")
class AdaptiveAttack(Attack):
    """An inner attack (default ``pgd``) run on a view of the defense: BPDA, EOT and/or the
    reject-class view, each ``"auto"`` (from the defense's structure at call time) or fixed.

    Options: ``inner``, ``inner_options`` (e.g. ``{steps: 20}``), ``bpda`` (auto | true |
    false), ``surrogate`` ("auto": the preprocessor's surrogate when it has one, else identity;
    "identity"), ``eot`` ("auto": ``eot_draws`` when the defense is random; or a number of
    draws, 0 = off), ``eot_draws``, ``detector`` (auto | reject-class | ignore), ``gamma`` (reject
    logit slope). Records in ``extras``: the view used and, under BPDA, how many points are
    adversarial on the surrogate path but not on the real defense (the transfer-failure flag).
    """

    threats: ClassVar[tuple[str, ...]] = ("linf", "l2")

    def __init__(self, *, threat: str | None = None, inner: str = "pgd",
                 inner_options: dict[str, Any] | None = None, bpda: Any = "auto",
                 surrogate: str = "auto", eot: Any = "auto", eot_draws: int = 10,
                 detector: str = "auto", gamma: float = 1.0, seed: int = 0) -> None:
        super().__init__(threat=threat, seed=seed, inner=inner,
                         inner_options=dict(inner_options or {}),
                         bpda=bpda, surrogate=surrogate, eot=eot, eot_draws=int(eot_draws),
                         detector=detector, gamma=float(gamma), kind="white-box")
        _inner_attack(inner, inner_options, self.threat, seed)  # fail early on bad options

    def run(self, model, images, labels, eps, *, seed, context):
        o = self.options
        defense = unwrap(model)
        use_bpda, draws, reject = _resolve_choices(defense, images, o["bpda"], o["eot"],
                                                   o["detector"], o["eot_draws"])
        view, info = build_view(defense, images, labels, bpda=use_bpda, eot_draws=draws,
                                reject=reject, surrogate=o["surrogate"], gamma=o["gamma"])
        inner = _inner_attack(o["inner"], o["inner_options"], self.threat, self.seed)
        res = inner(view, images, labels, eps, seed=seed,
                    context=context)
        _scale_passes(res, info["passes_per_call"])
        res.extras.update({k: v for k, v in info.items() if k != "passes_per_call"})
        if use_bpda:
            res.extras.update(surrogate_transfer(defense, view, res.adv, labels))
            res.forward_passes += 2 * len(labels)
        return res


def surrogate_transfer(defense: nn.Module, view: nn.Module, adv: torch.Tensor,
                       labels: torch.Tensor) -> dict[str, int]:
    """Points adversarial on the BPDA approximation ``classifier(s(x'))`` but not on the real
    defense (EVALUATION.md check 9)."""
    bp = view
    while not isinstance(bp, BPDAView):
        bp = bp._modules["model"]
    with torch.no_grad():
        sur = bp.surrogate_logits(adv).argmax(1) != labels
        real = defense(adv).argmax(1) != labels
    return {"surrogate_adversarial": int(sur.sum()),
            "surrogate_transfer_failures": int((sur & ~real).sum()),
            "surrogate_kind": bp.surrogate_kind}


@ATTACKS.register("bpda")
def bpda(**kwargs: Any) -> AdaptiveAttack:
    """BPDA + an inner attack (default PGD): real forward, identity/surrogate backward."""
    kwargs.setdefault("bpda", True)
    kwargs.setdefault("eot", 0)
    kwargs.setdefault("detector", "ignore")
    return AdaptiveAttack(**kwargs)


@ATTACKS.register("eot")
def eot(**kwargs: Any) -> AdaptiveAttack:
    """EOT + an inner attack: gradients averaged over ``eot`` draws (default 10)."""
    kwargs.setdefault("bpda", False)
    kwargs.setdefault("eot", kwargs.get("eot_draws", 10))
    kwargs.setdefault("detector", "ignore")
    return AdaptiveAttack(**kwargs)


@ATTACKS.register("bpda_eot")
def bpda_eot(**kwargs: Any) -> AdaptiveAttack:
    """BPDA and EOT together (random, non-differentiable preprocessors)."""
    kwargs.setdefault("bpda", True)
    kwargs.setdefault("eot", kwargs.get("eot_draws", 10))
    kwargs.setdefault("detector", "ignore")
    return AdaptiveAttack(**kwargs)


@ATTACKS.register("reject_class_pgd")
def reject_class_pgd(**kwargs: Any) -> AdaptiveAttack:
    """The detector folded in as a reject class, attacked with PGD (BPDA/EOT automatic)."""
    kwargs.setdefault("detector", "reject-class")
    return AdaptiveAttack(**kwargs)


@ATTACKS.register("transfer")
class TransferAttack(Attack):
    """Craft with an inner attack on the bare classifier (``defense.classifier``) and let the
    harness evaluate the result on the defense: the gray-box (transfer) number."""

    threats: ClassVar[tuple[str, ...]] = ("linf", "l2")

    def __init__(self, *, threat: str | None = None, inner: str = "pgd",
                 inner_options: dict[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__(threat=threat, seed=seed, inner=inner,
                         inner_options=dict(inner_options or {}), kind="transfer")
        _inner_attack(inner, inner_options, self.threat, seed)

    def run(self, model, images, labels, eps, *, seed, context):
        defense = unwrap(model)
        source = getattr(defense, "classifier", None)
        if source is None:
            raise ValueError(f"{type(defense).__name__} has no .classifier to transfer from")
        inner = _inner_attack(self.options["inner"], self.options["inner_options"], self.threat,
                              self.seed)
        res = inner(source, images, labels, eps, seed=seed,
                    context=context)
        with torch.no_grad():
            res.extras["source_adversarial"] = int((source(res.adv).argmax(1) != labels).sum())
        # iterates were judged on the source, not the defense: no silent-success evidence
        res.any_iterate_adversarial = torch.zeros(len(labels), dtype=torch.bool)
        res.best_iterate = None
        return res


@ATTACKS.register("square")
def square(*, threat: str | None = None, n_queries: int = 1000, seed: int = 0, **kw: Any):
    """Square Attack (black-box, score-based; pyautoattack), ``n_queries`` per point."""
    from attacks.standard import AutoAttack

    return AutoAttack(threat=threat, version="custom", attacks=["square"], n_queries=n_queries,
                      seed=seed, **kw)


@ATTACKS.register("detector_aware_pgd")
class DetectorAwarePGD(Attack):
    """PGD on ``L_cls - weight * max(0, (score(x) - threshold) / spread + margin)`` (Carlini and
    Wagner's break of MagNet, METHODS.md section 2): the adversarial input must be misclassified
    AND below the detector's threshold.

    ``loss``: "margin" (C&W: ``min(max_{j!=y} z_j - z_y, confidence)``) or "ce"; ``spread`` is the
    standard deviation of the detector score on the clean batch, so ``margin`` and ``weight``
    are in units of the clean score spread. The classifier path uses BPDA / EOT when the
    defense needs them (``bpda``, ``eot`` as in ``adaptive``). Own loop: it records the
    objective per step and sample, counts passes, and returns per sample the FIRST iterate that
    is misclassified and unflagged (else the iterate with the highest objective).
    Without a detector it is plain PGD on the chosen loss.
    """

    threats: ClassVar[tuple[str, ...]] = ("linf", "l2")

    def __init__(self, *, threat: str | None = None, steps: int = 20, restarts: int = 1,
                 rel_stepsize: float | None = None, weight: float = 10.0, margin: float = 0.1,
                 loss: str = "margin", confidence: float = 1.0, bpda: Any = "auto",
                 surrogate: str = "auto", eot: Any = "auto", eot_draws: int = 10,
                 seed: int = 0) -> None:
        if int(steps) < 1 or int(restarts) < 1:
            raise ValueError(f"detector_aware_pgd needs steps >= 1 and restarts >= 1, got "
                             f"{steps}, {restarts}")
        if loss not in ("margin", "ce"):
            raise ValueError(f"loss must be 'margin' or 'ce', got {loss!r}")
        rel = 2.5 / int(steps) if rel_stepsize is None else float(rel_stepsize)
        super().__init__(threat=threat, seed=seed, steps=int(steps), restarts=int(restarts),
                         rel_stepsize=rel, weight=float(weight), margin=float(margin), loss=loss,
                         confidence=float(confidence), bpda=bpda, surrogate=surrogate, eot=eot,
                         eot_draws=int(eot_draws), kind="white-box")

    def _cls_loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.options["loss"] == "ce":
            return F.cross_entropy(z, y, reduction="none")
        zy = z.gather(1, y.view(-1, 1)).squeeze(1)
        other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).max(1).values
        return (other - zy).clamp(max=self.options["confidence"])

    def _random_start(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        if self.threat == "linf":
            d = torch.empty_like(x).uniform_(-eps, eps)
        else:
            d = torch.randn_like(x)
            n = d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            r = torch.rand(len(x), 1, 1, 1, device=x.device)
            d = d / n * r * eps
        return (x + d).clamp(0, 1)

    def _project(self, x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
        d = x_adv - x
        if self.threat == "linf":
            d = d.clamp(-eps, eps)
        else:
            n = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            d = d * torch.clamp(eps / n.clamp_min(1e-12), max=1.0)
        return (x + d).clamp(0, 1)

    def run(self, model, images, labels, eps, *, seed, context):
        o = self.options
        defense = unwrap(model)
        det = getattr(defense, "detector", None)
        use_bpda, draws, _ = _resolve_choices(defense, images, o["bpda"], o["eot"], "ignore",
                                              o["eot_draws"])
        if use_bpda or draws > 1:
            view, info = build_view(defense, images, labels, bpda=use_bpda, eot_draws=draws,
                                    reject=False, surrogate=o["surrogate"])
        else:
            view, info = model, {"bpda": None, "eot_draws": 0, "passes_per_call": 1}
        k = info["passes_per_call"]
        own_counting = view is not model
        x0, y = images.detach(), labels
        n = len(y)
        if det is not None:
            thr = det.threshold.float()
            if not torch.isfinite(thr):
                raise ValueError("the detector's threshold is not set: fit or calibrate it first")
            spread = _clean_spread(det, x0)
        alpha = o["rel_stepsize"] * eps
        best = x0.clone()
        found = torch.zeros(n, dtype=torch.bool, device=y.device)
        best_obj = torch.full((n,), float("-inf"), device=y.device)
        trace: list[torch.Tensor] = []
        fwd = bwd = 0
        for _ in range(o["restarts"]):
            x = self._random_start(x0, eps)
            for t in range(o["steps"] + 1):
                x = x.detach().requires_grad_(True)
                z = view(x).float()
                obj = self._cls_loss(z, y)
                flagged = torch.zeros(n, dtype=torch.bool, device=y.device)
                if det is not None:
                    s = det.score(x).float().view(-1)
                    obj = obj - o["weight"] * F.relu((s - thr) / spread + o["margin"])
                    flagged = (s > thr).detach()
                fwd += n * (k if own_counting else 0) + (n if det is not None else 0)
                with torch.no_grad():
                    success = (z.argmax(1) != y) & ~flagged
                    take = (success & ~found) | (~found & ~success & (obj > best_obj))
                    best[take] = x.detach()[take]
                    best_obj = torch.where(take, obj.detach(), best_obj)
                    found |= success
                trace.append(obj.detach().cpu())
                if t == o["steps"] or bool(found.all()):
                    break
                (grad,) = torch.autograd.grad(obj.sum(), x)
                bwd += n * (k if own_counting else 1)
                with torch.no_grad():
                    if self.threat == "linf":
                        x = x + alpha * grad.sign()
                    else:
                        g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                        x = x + alpha * g
                    x = self._project(x, x0, eps)
            if bool(found.all()):
                break
        res = AttackResult(adv=best, loss_trace=torch.stack(trace),
                           iterations=o["steps"] * o["restarts"],
                           any_iterate_adversarial=found.cpu(),
                           best_iterate=best.clone(), forward_passes=fwd,
                           backward_passes=bwd if own_counting else 0)
        res.extras.update({k2: v for k2, v in info.items() if k2 != "passes_per_call"})
        res.extras["detector_evading"] = int(found.sum())
        if use_bpda:
            res.extras.update(surrogate_transfer(defense, view, best, labels))
        return res
