"""Evidence that a row's attacks were strong enough (EVALUATION.md, "Evidence ... per row").

Per attacked cell, on a bounded subsample (``checks`` options, defaults in
:data:`bench.core.config.DEFAULT_CHECKS`), each function returns one *check record*
``{code, status, seen, ...}`` with ``status`` one of ``pass`` / ``fail`` / ``n/a``; the runner
stores them in the cell's ``metrics["checks"]`` and :mod:`leaderboard.checklist` folds them,
with the cell flags, into the per-row checklist.

* :func:`binarization_test`: Zimmermann et al., "Increasing Confidence in Adversarial
  Robustness Evaluations" (NeurIPS 2022).
* :func:`unstable_predictions`: Pintor et al. 2022's "unstable predictions" indicator.
* :func:`single_step_check`: Carlini et al. 2019, an iterative attack is at least as strong as a
  single-step one (FGSM, here PGD with one step of size eps and no random start).
* :func:`gradient_free_check`: a gradient-free attack (Square) does not beat the white-box one.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Mapping

import torch
from torch import nn

from bench.core.schema import flag
from bench.harness import checks as checks_


def _status(code: str, status: str, seen: str, **extra: Any) -> dict[str, Any]:
    return {"code": code, "status": status, "seen": seen, **extra}


# -----------------------------------------------------------------------------------------------
# the binarization test
# -----------------------------------------------------------------------------------------------
def final_linear(module: nn.Module) -> tuple[str, nn.Linear] | None:
    """The last :class:`torch.nn.Linear` registered in ``module`` (the readout whose input is
    the "feature layer"), or None when there is none."""
    found = None
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            found = (name, m)
    return found


class BinarizedDefense(nn.Module):
    """The defense with its readout replaced by a 2-way linear head: same preprocessor (and
    therefore the same BPDA / EOT choices of the adaptive attacks), same feature extractor."""

    def __init__(self, defense: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        from defenses.base import Defense

        classifier = copy.deepcopy(defense.classifier)
        name, _ = final_linear(classifier)
        parent = classifier
        *path, last = name.split(".")
        for p in path:
            parent = getattr(parent, p)
        setattr(parent, last, head)
        self.inner = Defense(classifier, getattr(defense, "preprocessor", None), num_classes=2)
        self.inner.random = bool(getattr(getattr(defense, "structure", None), "random", False))
        self.eval()  # the wrapper too: an attack restores the mode it found (BatchNorm!)

    @property
    def structure(self):
        return self.inner.structure

    @property
    def classifier(self):
        return self.inner.classifier

    @property
    def preprocessor(self):
        return self.inner.preprocessor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _features(defense: nn.Module, x: torch.Tensor, *, logits: bool = False):
    """The input of the defense's final linear layer (after the preprocessor); with
    ``logits``, also the defense's output from the same forward pass."""
    _, lin = final_linear(defense.classifier)
    got: list[torch.Tensor] = []
    h = lin.register_forward_hook(lambda m, inp, out: got.append(inp[0].detach()))
    try:
        with torch.no_grad():
            out = defense(x)
    finally:
        h.remove()
    f = got[-1].flatten(1).float()
    return (f, out.detach().float()) if logits else f


def _ball_sample(x: torch.Tensor, eps: float, threat: str, radius: float, k: int,
                 gen: torch.Generator, *, surface: bool = False) -> torch.Tensor:
    """``k`` points around one image ``x`` (C,H,W): uniformly inside (or, with ``surface``, on
    the boundary of: Linf corners, L2 sphere) the ball of radius ``radius * eps``; clipped to
    [0, 1] (clipping only moves a point closer to ``x``, so it stays inside the ball)."""
    shape = (k,) + tuple(x.shape)
    if threat == "linf":
        if surface:
            d = torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
        else:
            d = torch.rand(shape, generator=gen) * 2 - 1
        d = d * radius * eps
    else:
        d = torch.randn(shape, generator=gen)
        d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        r = torch.ones(k) if surface else torch.rand(k, generator=gen) ** (1.0 / d[0].numel())
        d = d * (r * radius * eps).view(-1, 1, 1, 1)
    return (x.unsqueeze(0).cpu() + d).clamp(0, 1).to(x.device)


def _boundary_point(x: torch.Tensor, eps: float, threat: str, gen: torch.Generator
                    ) -> torch.Tensor:
    """One point at distance ``eps`` from ``x`` after clipping to [0, 1] (where the image
    allows): a random Linf corner, or a random L2 direction grown until the clipped
    perturbation has norm ``eps`` (the reference's "clipping-aware rescaling", by bisection)."""
    p = _ball_sample(x, eps, threat, 1.0, 1, gen, surface=True)
    if threat == "linf":
        return p
    x1 = x.unsqueeze(0)
    d = p - x1
    d = d / d.flatten(1).norm().clamp_min(1e-12)

    def norm_at(s: float) -> float:
        return float(((x1 + s * d).clamp(0, 1) - x1).flatten().norm())

    lo, hi = eps, eps
    while norm_at(hi) < eps * (1 - 1e-4) and hi < 64 * eps:
        lo, hi = hi, hi * 2
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if norm_at(mid) < eps else (lo, mid)
    return _project((x1 + hi * d).clamp(0, 1), x1, eps, threat)


def _fit_head(f_neg: torch.Tensor, f_pos: torch.Tensor, *, closeness: float = 0.999,
              logit_range: float | None = None) -> nn.Linear | None:
    """The binary readout: a logistic regression (scikit-learn, no penalty, classes weighted
    equally) of the inner points' features (class 0) against the boundary point's (class 1),
    as in the reference implementation; ``None`` when it does not separate them.

    Then, as the reference does: the decision boundary is moved towards the boundary point
    (``closeness``: 0 keeps the regression's, 0.999 leaves the boundary point just inside
    class 1, so a random point of the ball is class 0 and only a search that reaches at
    least the boundary point's score solves the task), and the logits are rescaled so their
    range over the training points equals ``logit_range`` (the defense's own logit range on
    them: an attack sees losses of its usual size, never an overflowed or vanished one).
    Features are divided by one global scale only, which keeps the regression's geometry."""
    from sklearn.linear_model import LogisticRegression

    feats = torch.cat([f_neg, f_pos]).double()
    scale = float(feats.std()) or 1.0
    mu = f_neg.double().mean(0)
    z = ((feats - mu) / scale).numpy()
    y = [0] * len(f_neg) + [1] * len(f_pos)
    reg = LogisticRegression(C=1e6, class_weight="balanced", max_iter=2000, tol=1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # separable data: lbfgs stops at max_iter by design
        reg.fit(z, y)
    w = torch.from_numpy(reg.coef_[0]) / scale
    b = float(reg.intercept_[0]) - float(w @ mu)
    score = feats @ w + b  # class 1 logit minus class 0 logit
    neg, pos = score[:len(f_neg)], score[len(f_neg):]
    if not (float(neg.max()) < 0 < float(pos.min())):
        return None
    b -= closeness * float(pos.min())  # the boundary point ends just inside class 1
    score = score - closeness * float(pos.min())
    spread = float(score.max() - score.min())
    s = (logit_range / spread) if logit_range and spread > 0 else 1.0
    head = nn.Linear(f_neg.shape[1], 2)
    with torch.no_grad():  # class 1 logit minus class 0 logit = the rescaled score
        head.weight.zero_()
        head.bias.zero_()
        head.weight[1] = (w * s).float()
        head.bias[1] = b * s
    return head


def binarization_test(defense: nn.Module, attack, threat: str, eps: float, images: torch.Tensor,
                      labels: torch.Tensor, *, n: int = 8, n_inner: int = 999,
                      inner_gap: float = 0.05, closeness: float = 0.999, probes: int = 32,
                      seed: int = 0, min_pass_rate: float = 0.9,
                      tasks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The binarization test on ``n`` evaluation points (Zimmermann et al. 2022; settings of the
    reference implementation, google-research/active-adversarial-tests).

    For each point x0: features (the input of the defense's final linear layer, after its
    preprocessor) of x0 and of ``n_inner - 1`` points drawn uniformly inside the ball of
    radius ``(1 - inner_gap) * eps`` are labelled 0; one point on the boundary of the epsilon
    ball (a random Linf corner / L2 sphere point, clipped to the image range, so within
    epsilon) is labelled 1. A logistic regression on these features replaces the readout
    (:func:`_fit_head`: decision boundary moved to ``closeness`` of the way to the boundary
    point, logits rescaled to the defense's own range). An adversarial example inside the ball
    then provably exists: the boundary point. The task is *valid* when the new model
    classifies x0 as 0 and the boundary point as 1, and *informative* when none of ``probes``
    random points of the ball (half uniform inside it, half on its boundary) is class 1 (a task
    that noise solves says nothing about the attack; counted in ``seen``, not scored).
    ``attack`` is run on the binary model with label 0; it passes the point when its output,
    projected into the ball and re-scored, is class 1. Returns a check record with the pass
    rate over informative tasks; ``fail`` below ``min_pass_rate``.

    [reconstruction] The reference repeats the fit until it separates perfectly and also
    reports the random attack success rate; here a task the regression does not separate is
    invalid and one a random probe solves is not scored. ``n_inner`` (the reference's 999),
    ``inner_gap`` (0.05), ``closeness`` (0.999) and ``probes`` are configurable.
    Not applicable when the defense exposes no ``classifier`` with a final ``nn.Linear``.
    ``tasks`` (from :func:`binary_tasks`) reuses the binary tasks of another attack of the same
    row (they depend on the defense, threat, epsilon and points only).
    """
    code = "binarization"
    why = binarization_unavailable(defense)
    if why:
        return _status(code, "n/a", why)
    if tasks is None:
        tasks = binary_tasks(defense, threat, eps, images[:n], n_inner=n_inner,
                             inner_gap=inner_gap, closeness=closeness, probes=probes, seed=seed)
    passed = valid = trivial = 0
    points: list[int | None] = []  # per point: 1 found, 0 missed, None invalid / not scored
    errors: list[str] = []
    for t in tasks:
        if t["state"] == "invalid":
            points.append(None)
            continue
        valid += 1
        if t["state"] == "trivial":
            trivial += 1
            points.append(None)
            continue
        x0, bin_def = t["x0"], t["model"]
        y0 = torch.zeros(1, dtype=torch.long, device=x0.device)
        try:
            adv = attack(bin_def, x0.unsqueeze(0), y0, eps, seed=seed).adv
        except Exception as exc:  # noqa: BLE001 - reported in the record, not raised
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            points.append(None)
            continue
        adv = _project(adv.detach(), x0.unsqueeze(0), eps, threat)
        bin_def.eval()
        with torch.no_grad(), checks_.seeded(x0, seed):
            hit = int(int(bin_def(adv).argmax(1)) == 1)
        passed += hit
        points.append(hit)
    scored = valid - trivial - len(errors)
    extra = dict(n=len(tasks), valid=valid, trivial=trivial)
    if valid == 0:
        return _status(code, "n/a", f"no valid binary task on {len(tasks)} points (the "
                       "features do not separate the boundary point)", **extra)
    if errors and scored <= 0:  # every scored task errored: the attack cannot run
        return _status(code, "n/a", f"the attack cannot run on a 2-class task ({errors[0]})",
                       **extra)
    if scored <= 0:
        return _status(code, "n/a", f"random points of the ball solve all {valid} valid binary "
                       "tasks (none tells a working attack from noise)", **extra)
    rate = passed / scored
    status = "pass" if rate >= min_pass_rate else "fail"
    return _status(code, status, f"attack found the known adversarial on {passed}/{scored} "
                   f"binary tasks ({rate:.0%}; {len(tasks) - valid} invalid, {trivial} solved by "
                   "random points)",
                   pass_rate=rate, passed=passed, points=points, min_pass_rate=min_pass_rate,
                   scored=scored, **extra)


def binarization_unavailable(defense: nn.Module) -> str | None:
    """Why the binarization test does not apply to ``defense`` (None when it does)."""
    clf = getattr(defense, "classifier", None)
    if not isinstance(clf, nn.Module) or final_linear(clf) is None:
        return ("the defense exposes no classifier with a final linear layer (no feature layer "
                "to binarize)")
    if getattr(defense, "detect", None) is not None and \
            getattr(getattr(defense, "structure", None), "has_detector", False):
        return "detector defense: the binary task has no reject option"
    return None


def binary_tasks(defense: nn.Module, threat: str, eps: float, images: torch.Tensor, *,
                 n_inner: int = 999, inner_gap: float = 0.05, closeness: float = 0.999,
                 probes: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    """The binary tasks of :func:`binarization_test`, one per image: ``{x0, model, state}``
    with state ``ok``, ``invalid`` (the readout does not separate the boundary point, or the
    binary model does not put x0 in class 0 and the boundary point in class 1) or ``trivial``
    (a random probe of the ball is already class 1)."""
    gen = torch.Generator().manual_seed(seed)
    out: list[dict[str, Any]] = []
    for x0 in images:
        inner = torch.cat([x0.unsqueeze(0),
                           _ball_sample(x0, eps, threat, 1.0 - inner_gap, n_inner - 1, gen)])
        boundary = _boundary_point(x0, eps, threat, gen)
        with checks_.seeded(x0, seed):
            f_neg, logits = _features(defense, inner, logits=True)
            f_pos = _features(defense, boundary)
        head = _fit_head(f_neg.cpu(), f_pos.cpu(), closeness=closeness,
                         logit_range=float(logits.max() - logits.min()))
        if head is None:
            out.append({"x0": x0, "model": None, "state": "invalid"})
            continue
        bin_def = BinarizedDefense(defense, head.to(x0.device))
        half = probes // 2
        probe = torch.cat([_ball_sample(x0, eps, threat, 1.0, half, gen),
                           _ball_sample(x0, eps, threat, 1.0, probes - half, gen,
                                        surface=True)]) if probes > 0 else None
        with torch.no_grad(), checks_.seeded(x0, seed):
            ok = (int(bin_def(x0.unsqueeze(0)).argmax(1)) == 0 and
                  int(bin_def(boundary).argmax(1)) == 1)
            noise = probe is not None and bool((bin_def(probe).argmax(1) == 1).any())
        out.append({"x0": x0, "model": bin_def,
                    "state": "invalid" if not ok else "trivial" if noise else "ok"})
    return out


def _project(adv: torch.Tensor, x: torch.Tensor, eps: float, threat: str) -> torch.Tensor:
    """Into the eps ball and [0, 1] (an attack's point is checked, never trusted)."""
    d = adv - x
    if threat == "linf":
        d = d.clamp(-eps, eps)
    else:
        nrm = d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        d = d * (eps / nrm).clamp(max=1.0)
    return (x + d).clamp(0, 1)


# -----------------------------------------------------------------------------------------------
# unstable predictions (Pintor et al. 2022)
# -----------------------------------------------------------------------------------------------
def unstable_predictions(defense: nn.Module, adv: torch.Tensor, labels: torch.Tensor,
                         threat: str, eps: float, *, k: int = 8, radius: float = 0.05,
                         tol: float = 0.1, floor: float = 0.1, seed: int = 0) -> dict[str, Any]:
    """The cross-entropy loss at the given points under ``k`` small random perturbations
    (radius ``radius * eps``, inside the ball): ``fail`` when the mean relative spread
    (max - min over the mean, a mean below ``floor`` nats counting as ``floor``) exceeds
    ``tol``, or the predicted class changes on more than a quarter of the points.
    [reconstruction] Pintor et al. use the loss variance around the final point; the harness
    passes the cell's clean-correct points. The floor keeps a confident prediction (a loss of
    0.001 that noise moves to 0.0012) from reading as 20% instability: an undefended model
    passes, random logits fail. The tolerance is configurable (``stability_tol``)."""
    code = "unstable_predictions"
    if len(adv) == 0:
        return _status(code, "n/a", "no attacked points")
    gen = torch.Generator().manual_seed(seed)
    losses, preds = [], []
    with torch.no_grad():
        for j in range(k):
            pts = torch.stack([_ball_sample(a, eps, threat, radius, 1, gen)[0] for a in adv])
            with checks_.seeded(adv, seed + j):
                out = defense(pts).float()
            losses.append(nn.functional.cross_entropy(out, labels, reduction="none"))
            preds.append(out.argmax(1))
    L = torch.stack(losses)  # (k, N)
    spread = ((L.max(0).values - L.min(0).values) / L.mean(0).abs().clamp_min(floor)).mean()
    P = torch.stack(preds)
    flips = float((P != P[0]).any(0).float().mean())
    bad = float(spread) > tol or flips > 0.25
    return _status(code, "fail" if bad else "pass",
                   f"loss spread {float(spread):.1%} of its mean, prediction changes on "
                   f"{flips:.0%} of {len(adv)} points under noise of radius {radius:g} eps",
                   spread=float(spread), flips=flips)


# -----------------------------------------------------------------------------------------------
# sanity checks against other attacks on the same subsample
# -----------------------------------------------------------------------------------------------
def _broken(defense, attack, x, y, eps, seed: int, draws: int) -> torch.Tensor:
    from bench.harness.scoring import score

    adv = attack(defense, x, y, eps, seed=seed).adv
    s = score(defense, _project(adv.detach(), x, eps, attack.threat), y, draws=draws, seed=seed)
    return ~(s.correct | s.flagged)


def compare_attack(code: str, other: str, defense, threat: str, eps: float, x: torch.Tensor,
                   y: torch.Tensor, robust: torch.Tensor, *, seed: int = 0, draws: int = 1,
                   options: Mapping[str, Any] | None = None, tol: int = 0,
                   broken: torch.Tensor | None = None) -> dict[str, Any]:
    """Run ``other`` on the clean-correct subsample ``x`` and fail when it breaks more than
    ``tol`` points the cell's attack left ``robust``. ``broken`` (the record's own ``broken``
    from an earlier cell on the same points) skips the run: it does not depend on the cell."""
    from bench.core.registry import create_attack

    if broken is None:
        try:
            atk = create_attack(other, threat=threat, seed=seed, **dict(options or {}))
            broken = _broken(defense, atk, x, y, eps, seed, draws)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return _status(code, "n/a", f"{other} could not run ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})")
    broken = broken.to(robust.device)
    only = int((broken & robust).sum())
    return _status(code, "fail" if only > tol else "pass",
                   f"{other} broke {int(broken.sum())}/{len(y)} points, {only} of them left "
                   "robust by this attack", only=only, n=len(y),
                   broken=[int(b) for b in broken.cpu().tolist()], name=other)


def single_step_check(defense, threat, eps, x, y, robust, **kw) -> dict[str, Any]:
    return compare_attack("iterative_beats_single_step", "pgd", defense, threat, eps, x, y,
                          robust, options={"steps": 1, "rel_stepsize": 1.0,
                                           "random_start": False}, **kw)


def gradient_free_check(defense, threat, eps, x, y, robust, *, queries: int = 300,
                        **kw) -> dict[str, Any]:
    return compare_attack("gradient_free", "autoattack", defense, threat, eps, x, y, robust,
                          options={"version": "custom", "attacks": ["square"],
                                   "n_queries": queries}, **kw)


def flag_records(plan, checks: Mapping[str, Any], agg: Mapping[str, Any], flags: list[dict],
                 conv: list[dict], doublable: bool) -> list[dict[str, Any]]:
    """Check records for the checks whose failure is a flag (so the checklist can tell "ran and
    passed" from "did not run"): loss trace, gradients, BPDA transfer, large epsilon /
    unconstrained attack, doubled iterations."""
    codes = {f["code"] for f in flags}
    seen_of = {f["code"]: f.get("seen", "") for f in flags}
    flag_of = {"silent_success": "silent_success", "loss_trace": "non_convergence",
               "gradients": "zero_gradients", "transfer_failure": "surrogate_transfer_failure",
               "unconstrained_attack": "unbounded_attack_fails",
               "large_eps": "above_chance_large_eps"}
    out = []

    def rec(code: str, ran: bool, failed: bool, seen_pass: str, seen_na: str) -> None:
        status = (FAIL_ if failed else "pass") if ran else "n/a"
        seen = seen_na if not ran else seen_of.get(flag_of.get(code, ""), "") if failed \
            else seen_pass
        out.append(_status(code, status, seen or seen_pass))

    rec("silent_success", True, "silent_success" in codes,
        "the returned points are the best iterates (none adversarial only in between)", "")
    trace = agg.get("loss_still_moving") is not None and not getattr(plan, "minimal", False)
    rec("loss_trace", trace, "non_convergence" in codes and not conv,
        "the attack loss is flat over the last 20% of the steps", "no loss trace")
    rec("gradients", True, "zero_gradients" in codes and not agg.get("bpda"),
        "input gradients non-zero and finite", "")
    if agg.get("bpda") and "zero_gradients" in codes:
        out[-1]["seen"] = ("input gradients through the defense are zero or NaN, and this "
                           "attack uses BPDA (backward through the identity)")
        out[-1]["bpda"] = True
    rec("transfer_failure", agg.get("surrogate_kind") == "surrogate",
        "surrogate_transfer_failure" in codes,
        "points adversarial on the BPDA surrogate are adversarial on the defense",
        "no differentiable surrogate used")
    n_big = int(checks.get("large_eps_subset", 0) or 0)
    rec("unconstrained_attack", n_big > 0, "unbounded_attack_fails" in codes,
        f"PGD at Linf eps 0.5 broke ~100% of {n_big} samples", "large_eps_subset is 0")
    rec("large_eps", n_big > 0, "above_chance_large_eps" in codes,
        f"accuracy at Linf eps 0.5 at most chance on {n_big} samples", "large_eps_subset is 0")
    n_dbl = int(checks.get("convergence_subset", 0) or 0)
    rec("doubled_iterations", n_dbl > 0 and doublable, bool(conv),
        f"doubling the iterations left robust accuracy within tolerance on up to {n_dbl} samples",
        "convergence_subset is 0" if n_dbl <= 0 else "the attack has no iteration knob")
    if conv:
        out[-1]["seen"] = conv[0]["seen"]
    return out


FAIL_ = "fail"


def as_flags(records: list[dict[str, Any]]) -> list[dict]:
    """The failed check records as cell flags (so the Flags column shows them too)."""
    return [flag(r["code"], r["seen"]) for r in records  # the others are properties of the
            if r.get("status") == "fail" and r["code"] == "unstable_predictions"]  # suite
