"""Scoring: re-run the defense on given inputs and check an attack's output independently.

* :func:`score` re-runs the defense (worst of ``draws`` passes for random defenses, detector
  flags; EVALUATION.md scoring);
* :func:`check_adversarials` checks adversarials independently of the attack (epsilon ball +
  1e-6, [0, 1], no NaN);
* :func:`attack_batch` runs one attack on one batch, re-scores the adversarials and returns the
  per-sample rows (:class:`bench.core.schema.SampleRow`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from attacks.base import Attack, RunContext, perturbation_norm
from bench.core.schema import SampleRow

EPS_TOL = 1e-6


class AttackContractError(RuntimeError):
    """An attack returned inputs outside its threat model (a bug in the attack)."""


@dataclass
class Scored:
    pred: torch.Tensor
    correct: torch.Tensor
    flagged: torch.Tensor


# scoring -------------------------------------------------------------------------------------
@torch.no_grad()
def score(defense, x: torch.Tensor, y: torch.Tensor, *, draws: int = 1, seed: int = 0) -> Scored:
    """Re-run the defense: worst of ``draws`` forward passes when it is random."""
    random = bool(defense.structure.random) if hasattr(defense, "structure") else False
    k = draws if random else 1
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        preds = [defense(x).argmax(1) for _ in range(k)]
        flagged = defense.detect(x) if hasattr(defense, "detect") else None
    correct = torch.stack([p == y for p in preds]).all(0)
    if flagged is None:
        flagged = torch.zeros_like(correct)
    return Scored(preds[0], correct, flagged.bool())


def check_adversarials(adv: torch.Tensor, x: torch.Tensor, eps: float, threat: str,
                       minimal_norm: bool, attack_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent check of the attack's output; returns (adv, norm).

    Bounded attacks must stay in the ball (+1e-6) and [0, 1] with no NaN, else
    :class:`AttackContractError`. Minimal-norm attacks (CW) may overshoot: those samples are
    replaced by the clean input (counted as not broken), as the threat model requires.
    """
    if adv.shape != x.shape:
        raise AttackContractError(f"attack {attack_name} returned shape {tuple(adv.shape)} for "
                                  f"inputs {tuple(x.shape)}")
    if not torch.isfinite(adv).all():
        raise AttackContractError(f"attack {attack_name} returned NaN or infinite pixels")
    if adv.min() < 0 or adv.max() > 1:
        raise AttackContractError(f"attack {attack_name} returned pixels outside [0, 1]")
    if threat == "none":
        return adv, perturbation_norm(adv, x, "linf")
    norm = perturbation_norm(adv, x, threat)
    outside = norm > eps + EPS_TOL
    if outside.any():
        if not minimal_norm:
            raise AttackContractError(
                f"attack {attack_name} returned {int(outside.sum())} inputs outside the {threat} "
                f"ball of radius {eps:.6g} (max norm {float(norm.max()):.6g}); fix the attack's "
                "projection")
        adv = torch.where(outside.view(-1, 1, 1, 1), x, adv)
        norm = torch.where(outside, torch.zeros_like(norm), norm)
    return adv, norm


def attack_batch(defense, attack: Attack, x, y, eps, *, clean: Scored, seed: int,
                 draws: int, best_iterate: bool = True, attack_model=None,
                 context: RunContext | None = None) -> tuple[list[SampleRow], torch.Tensor, dict]:
    """Run one attack on one batch and return per-sample rows, adversarials and records.

    With ``best_iterate`` (default), a sample whose returned point is not adversarial but
    for which the tracer saw a valid adversarial iterate gets that iterate instead (many library
    attacks return their LAST iterate); the count is recorded. Silent success is then what
    remains: an iterate the attack saw as adversarial that re-scoring does not confirm.
    ``attack_model`` (default: the defense) is what the attack runs on, e.g. an autocast view
    (bench.harness.executors.AttackView); re-scoring always uses ``defense`` itself.
    """
    result = attack(defense if attack_model is None else attack_model, x, y, eps, seed=seed,
                    context=context)
    adv, norm = check_adversarials(result.adv, x, eps, attack.threat, attack.minimal_norm,
                                   repr(attack))
    s = score(defense, adv, y, draws=draws, seed=seed)
    anyadv = result.any_iterate_adversarial
    anyadv = anyadv.to(s.correct.device) if anyadv is not None else torch.zeros_like(s.correct)
    missed = anyadv & s.correct & ~s.flagged
    recovered = 0
    if best_iterate and missed.any() and result.best_iterate is not None:
        cand, cnorm = check_adversarials(
            torch.where(missed.view(-1, 1, 1, 1), result.best_iterate, adv), x, eps,
            attack.threat, True, repr(attack))
        s2 = score(defense, cand, y, draws=draws, seed=seed)
        take = missed & ~(s2.correct | s2.flagged)
        if take.any():
            adv = torch.where(take.view(-1, 1, 1, 1), cand, adv)
            norm = torch.where(take, cnorm, norm)
            s = Scored(torch.where(take, s2.pred, s.pred), torch.where(take, s2.correct, s.correct),
                       torch.where(take, s2.flagged, s.flagged))
            recovered = int(take.sum())
    clean_ok = clean.correct & ~clean.flagged
    adv_ok = s.correct | s.flagged
    robust = clean_ok & adv_ok
    n = len(y)
    it = result.iterations
    iters = it.tolist() if isinstance(it, torch.Tensor) else [it] * n
    silent = int((anyadv & s.correct & ~s.flagged & clean_ok).sum())
    fwd, bwd = divmod(result.forward_passes, max(n, 1)), divmod(result.backward_passes, max(n, 1))
    rows = [SampleRow(label=int(y[i]), attacked=1, clean_correct=int(clean.correct[i]),
                      clean_flagged=int(clean.flagged[i]), adv_correct=int(s.correct[i]),
                      adv_flagged=int(s.flagged[i]), robust=int(robust[i]), norm=float(norm[i]),
                      iterations=iters[i], forward_passes=fwd[0] + (i < fwd[1]),
                      backward_passes=bwd[0] + (i < bwd[1]),  # shares summing to the totals
                      any_iterate_adversarial=int(anyadv[i]), adv_pred=int(s.pred[i]))
            for i in range(n)]
    trace = result.loss_trace
    records = {"silent_success": silent, "recovered_best_iterates": recovered,
               "loss_still_moving": (0.0 if attack.minimal_norm
                                     else loss_still_moving(trace)),
               "loss_trace": (trace.float().reshape(len(trace), -1).mean(1).tolist()
                              if trace is not None else None),
               "forward_passes": result.forward_passes, "backward_passes": result.backward_passes,
               "log": result.extras.get("log", [])[-50:], **result_records(result)}
    detector = getattr(defense, "detector", None)
    if detector is not None and hasattr(detector, "score"):  # for the cell's AUROC
        with torch.no_grad():
            records["detector_scores"] = {
                "clean": detector.score(x).float().cpu().tolist(),
                "adv": detector.score(adv).float().cpu().tolist()}
    return rows, adv, records


def detector_summary(extras: Iterable[dict]) -> dict[str, Any] | None:
    """AUROC of the detector's scores on the attacked samples' clean inputs vs their
    adversarials, pooled over a cell's batches; None when the defense has no detector (or one
    class of scores is missing)."""
    clean = [v for e in extras for v in (e.get("detector_scores") or {}).get("clean", [])]
    adv = [v for e in extras for v in (e.get("detector_scores") or {}).get("adv", [])]
    if not clean or not adv:
        return None
    from sklearn.metrics import roc_auc_score

    labels = [0] * len(clean) + [1] * len(adv)
    scores = [float(v) if math.isfinite(v) else (1e30 if v > 0 else -1e30) for v in clean + adv]
    return {"auroc": float(roc_auc_score(labels, scores)), "n_clean": len(clean),
            "n_adversarial": len(adv)}


# an attack's records (stored per batch; the flags read them) ------------------------------
#: AutoAttack's log messages (pyautoattack checks.py) -> our flag codes
AUTOATTACK_PATTERNS = {
    "seems to be a randomized defense": "randomness",
    "output is a probability distribution": "probability_outputs",
    "points with zero gradient": "zero_gradients",
    "Square Attack has decreased the robust accuracy": "blackbox_beats_whitebox",
    "seems to be a dynamic defense": "dynamic_defense",
}


def autoattack_warnings(lines: Iterable[str]) -> list[str]:
    """AutoAttack's check warnings among its captured log lines (deduplicated, in order)."""
    return list(dict.fromkeys(line for line in lines
                              if any(p in line for p in AUTOATTACK_PATTERNS)))


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().tolist()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def result_records(result) -> dict[str, Any]:
    """Batch records taken from an AttackResult's ``extras`` (all but the raw log) plus
    AutoAttack's check warnings from its FULL log (the stored log is truncated)."""
    out = {k: _jsonable(v) for k, v in result.extras.items() if k != "log"}
    warn = autoattack_warnings(result.extras.get("log") or [])
    if warn:
        out["autoattack_warnings"] = warn
    return out


def loss_still_moving(trace: torch.Tensor | None, tail: float = 0.2, tol: float = 0.05) -> float:
    """Relative increase of the mean loss over the last ``tail`` of the steps (0 if flat)."""
    if trace is None or trace.ndim < 1 or len(trace) < 5:
        return 0.0
    m = trace.float().reshape(len(trace), -1).mean(1)
    k = max(2, int(len(m) * tail))
    start, end = float(m[-k]), float(m[-1])
    rel = (end - start) / (abs(start) + 1e-8)
    return rel if rel > tol else 0.0
