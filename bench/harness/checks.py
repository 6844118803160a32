"""The probes behind the randomness, probability-output and gradient checks, written once.

Two callers read them with their own thresholds and wording: the per-cell reliability flags
(:func:`bench.harness.flags.defense_checks`, EVALUATION.md checks 1-3) and a submission's contract
checks (:func:`bench.harness.validate.validate_defense`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def seeded(x: torch.Tensor, seed: int):
    """A private RNG scope seeded with ``seed`` (CUDA too when ``x`` lives there)."""
    rng = torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else [])

    class _Scope:
        def __enter__(self):
            rng.__enter__()
            torch.manual_seed(seed)

        def __exit__(self, *exc):
            return rng.__exit__(*exc)

    return _Scope()


def max_difference(outputs: list[torch.Tensor]) -> float:
    """The largest absolute difference of any output to the first (randomness, check 1)."""
    return max(float((o - outputs[0]).abs().max()) for o in outputs[1:])


def looks_like_probabilities(out: torch.Tensor, atol: float = 1e-3) -> bool:
    """Every row lies in [0, 1] and sums to 1 (check 2)."""
    ones = torch.ones(len(out), device=out.device)
    return bool(out.min() >= 0 and out.max() <= 1 and torch.allclose(out.sum(1), ones, atol=atol))


def cross_entropy_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.float(), y)


def margin_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """True-class logit minus the best other one, summed: unlike cross-entropy it does not
    underflow to zero on confidently classified images."""
    out = out.float()
    true = out.gather(1, y.view(-1, 1)).squeeze(1)
    other = out.masked_fill(nn.functional.one_hot(y, out.shape[1]).bool(),
                            float("-inf")).amax(1)
    return (true - other).sum()


def input_gradient(defense: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                   loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_loss,
                   seed: int | None = None) -> tuple[torch.Tensor | None, str]:
    """``(gradient of loss(defense(x), y) w.r.t. x, "")``, or ``(None, first line of the error)``
    when there is no graph at all; ``(None, "")`` when the output does not depend on the input
    through autograd (check 3). With ``seed`` the pass runs in a seeded private RNG scope."""
    xg = x.detach().clone().requires_grad_(True) if seed is not None else \
        x.clone().requires_grad_(True)
    try:
        if seed is not None:
            with seeded(x, seed), torch.enable_grad():
                (grad,) = torch.autograd.grad(loss(defense(xg), y), xg, allow_unused=True)
        else:
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(loss(defense(xg), y), xg, allow_unused=True)
    except RuntimeError as exc:
        return None, str(exc).splitlines()[0]
    return grad, ""


def bad_gradients(grad: torch.Tensor) -> torch.Tensor:
    """Per sample: the input gradient is all zero or has a NaN / inf."""
    g = grad.flatten(1)
    return (g.abs().sum(1) == 0) | ~torch.isfinite(g).all(1)
