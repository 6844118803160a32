"""Automatic flags for unreliable evaluations, computed per cell (EVALUATION.md, section
"Automatic checks"). Each flag is a dict ``{code, title, seen, try}`` stored with the cell and
shown in the leaderboard.

Checks that need only the defense and the data (randomness, probability outputs, gradients) run
once per (dataset, defense) in :func:`defense_checks`; checks on an attack's records
(silent success, non-convergence) run per cell in :func:`attack_checks`; checks across cells
(black-box beating white-box, epsilon sweeps, transfer) run in :func:`matrix_checks`.
"""

from __future__ import annotations

from typing import Any

import torch

FLAG_DOCS = {
    "randomness": ("Randomised defense", "use EOT (e.g. autoattack version=rand, eot draws)"),
    "probability_outputs": ("Outputs look like probabilities", "return logits; attacks on "
                            "softmax outputs suffer vanishing gradients"),
    "zero_gradients": ("Zero, NaN or missing input gradients", "use BPDA or a black-box attack"),
    "silent_success": ("Attack did not return its best iterate", "return the best iterate"),
    "non_convergence": ("Attack loss still moving at the last steps", "more steps or restarts"),
}


def flag(code: str, seen: str, **extra: Any) -> dict[str, Any]:
    title, suggestion = FLAG_DOCS.get(code, (code, ""))
    return {"code": code, "title": title, "seen": seen, "try": suggestion, **extra}


@torch.no_grad()
def _forward(defense, x):
    return defense(x).float()


def defense_checks(defense, images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0,
                   n: int = 16) -> list[dict]:
    """Randomness, probability outputs and input gradients on a few clean samples."""
    flags = []
    x, y = images[:n], labels[:n]
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        outs = [_forward(defense, x) for _ in range(3)]
    declared = bool(defense.structure.random) if hasattr(defense, "structure") else False
    diff = max(float((o - outs[0]).abs().max()) for o in outs[1:])
    if diff > 1e-4:
        flags.append(flag("randomness", f"repeated forward passes differ by up to {diff:.3g}"
                          + ("" if declared else " although the defense does not declare "
                             "randomness"), declared=declared))
    o = outs[0]
    if o.min() >= 0 and o.max() <= 1 and torch.allclose(o.sum(1), torch.ones(len(o)), atol=1e-3):
        flags.append(flag("probability_outputs", "every output row lies in [0, 1] and sums to 1"))
    xg = x.clone().requires_grad_(True)
    try:
        out = defense(xg)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        (grad,) = torch.autograd.grad(loss, xg, allow_unused=True)
    except RuntimeError as exc:  # no graph at all
        grad, err = None, str(exc).splitlines()[0]
    else:
        err = ""
    if grad is None:
        flags.append(flag("zero_gradients", "input gradients are unavailable" +
                          (f" ({err})" if err else "")))
    else:
        bad = (grad.flatten(1).abs().sum(1) == 0) | ~torch.isfinite(grad.flatten(1)).all(1)
        if bad.any():
            flags.append(flag("zero_gradients", f"{int(bad.sum())}/{len(bad)} samples have zero "
                              "or NaN input gradients"))
    return flags


def attack_checks(records: dict[str, Any]) -> list[dict]:
    """Checks on one cell's attack records (loss traces, iterates)."""
    flags = []
    silent = records.get("silent_success", 0)
    if silent:
        flags.append(flag("silent_success", f"{silent} samples had an adversarial intermediate "
                          "iterate but the returned point is not adversarial"))
    moving = records.get("loss_still_moving")
    if moving:
        flags.append(flag("non_convergence", f"mean loss rose by {moving:.1%} over the last 20% "
                          "of the steps"))
    return flags


def loss_still_moving(trace: torch.Tensor | None, tail: float = 0.2, tol: float = 0.05) -> float:
    """Relative increase of the mean loss over the last ``tail`` of the steps (0 if flat)."""
    if trace is None or trace.ndim < 1 or len(trace) < 5:
        return 0.0
    m = trace.float().reshape(len(trace), -1).mean(1)
    k = max(2, int(len(m) * tail))
    start, end = float(m[-k]), float(m[-1])
    rel = (end - start) / (abs(start) + 1e-8)
    return rel if rel > tol else 0.0
