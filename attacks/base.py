"""The attack contract (after foolbox 3: configure once, call with model and data).

An attack is configured with keyword-only options in ``__init__``; the defense, images,
labels, epsilon, the seed and the run context (:class:`RunContext`) are call arguments: nothing
is set on an attack from outside between calls. :meth:`Attack.__call__` is final
(``typing.final``, and a subclass that defines ``__call__`` is refused at class creation): it
validates inputs, seeds the attack in a private RNG scope, counts forward/backward passes, calls
the subclass's :meth:`Attack.run` with ``seed`` and ``context``, and clips the returned
adversarials into [0, 1]. The HARNESS (not the
attack) then re-checks the epsilon ball and re-scores the defense on the adversarials.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, final

import torch
from torch import nn

DEFAULT_SEED = 0


@dataclass(frozen=True)
class RunContext:
    """Where an attack call runs, as the harness knows it (all optional: an attack called from
    Python without one gets the defaults). Attacks that fit helpers of their own (the wrong-label
    latent attack's autoencoder) read the dataset and fit preset from it."""

    dataset: str | None = None
    dataset_options: Mapping[str, Any] | None = None
    device: str | None = None
    fit_preset: str | None = "quick"
    run_dir: str | None = None
    #: the defense's label in the matrix (figure names)
    defense: str | None = None


@dataclass
class AttackResult:
    """What one attack call returns for a batch."""

    adv: torch.Tensor
    #: the attack's own success claim (N,), or None; the harness re-scores anyway
    success: torch.Tensor | None = None
    #: per-iteration loss, shape (steps,) or (steps, N); None when unavailable
    loss_trace: torch.Tensor | None = None
    #: iterations used per sample (N,) or a scalar
    iterations: torch.Tensor | int | None = None
    #: per-sample: some intermediate iterate was adversarial (for the silent-success flag)
    any_iterate_adversarial: torch.Tensor | None = None
    #: per-sample first valid adversarial iterate seen by the tracer (the input where none)
    best_iterate: torch.Tensor | None = None
    forward_passes: int = 0
    backward_passes: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


class AttackTracer(nn.Module):
    """Wraps the attacked model: counts per-sample forward/backward passes and records, for every
    forward on the full batch, the per-sample cross-entropy and whether that iterate was a VALID
    adversarial (inside the epsilon ball and [0, 1], misclassified).

    This gives every attack, including library attacks we do not rewrite, a loss trace (for the
    non-convergence flag) and an "some iterate was adversarial" mask (for the silent-success
    flag) without touching the attack's code. Traces are recorded only for forwards whose batch
    is the attacked batch (sub-batches of AutoAttack's later stages are counted but not traced).
    """

    def __init__(self, model: nn.Module, images: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, eps: float = float("inf"),
                 threat: str = "none") -> None:
        super().__init__()
        self.model = model
        self.forward_passes = 0
        self.backward_passes = 0
        self._x0 = images
        self._y = labels
        self._eps = eps
        self._threat = threat
        self.losses: list[torch.Tensor] = []
        self.any_adversarial = (torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
                                if labels is not None else None)
        self.best = images.detach().clone() if images is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if x.requires_grad and torch.is_grad_enabled():
            # a model that cuts the graph (a purifier under no_grad) has UNAVAILABLE gradients:
            # attacks then see zero gradients (and the zero_gradients flag) instead of crashing
            out = out + 0.0 * x.sum()
        n = int(x.shape[0])
        self.forward_passes += n
        if out.requires_grad:
            def hook(grad, n=n):
                self.backward_passes += n
                return grad
            out.register_hook(hook)
        if self._x0 is not None and x.shape == self._x0.shape and out.ndim == 2:
            with torch.no_grad():
                logits = out.detach().float()
                self.losses.append(
                    nn.functional.cross_entropy(logits, self._y, reduction="none").cpu())
                norm = perturbation_norm(x.detach(), self._x0, self._threat)
                valid = (norm <= self._eps + 1e-6) & (x.detach().flatten(1).amin(1) >= 0) & (
                    x.detach().flatten(1).amax(1) <= 1)
                new = valid & (logits.argmax(1) != self._y) & ~self.any_adversarial
                if new.any():
                    self.best[new] = x.detach()[new]
                self.any_adversarial |= new
        return out

    def loss_trace(self) -> torch.Tensor | None:
        return torch.stack(self.losses) if self.losses else None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)


class Attack:
    """Base class. Subclasses list the threat models they support and implement :meth:`run`.

    ``threat`` is chosen at construction ("linf", "l2", or "none" for unbounded / semantic
    attacks). ``minimal_norm`` attacks (CW) search for the smallest perturbation and may return
    points outside the ball; the harness counts those as failures instead of as errors.
    """

    #: threat models this attack supports; the first is the default
    threats: ClassVar[tuple[str, ...]] = ("linf", "l2")
    #: True when the attack samples randomness (it is always seeded)
    random: ClassVar[bool] = True
    #: True when the attack minimises the norm rather than respecting a budget
    minimal_norm: ClassVar[bool] = False

    def __init__(self, *, threat: str | None = None, seed: int = DEFAULT_SEED,
                 **options: Any) -> None:
        threat = (threat or self.threats[0]).lower()
        if threat not in self.threats:
            raise ValueError(f"{type(self).__name__} supports threat models {list(self.threats)}, "
                             f"not {threat!r}")
        self.threat = threat
        self.seed = int(seed)
        self.options = options

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__call__" in cls.__dict__:
            raise TypeError(f"{cls.__name__} overrides Attack.__call__, which is final: implement "
                            "run(model, images, labels, eps, *, seed, context) instead")

    # subclasses implement ----------------------------------------------------------------
    def run(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, *,
            seed: int, context: RunContext) -> AttackResult:  # pragma: no cover - abstract
        """The attack on ``model`` (already wrapped in the tracer, in eval mode); ``seed`` is
        this call's seed (torch's RNG is already seeded with it), ``context`` the run's."""
        raise NotImplementedError

    # the final call ----------------------------------------------------------------------
    @final
    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 eps: float, *, seed: int | None = None,
                 context: RunContext | None = None) -> AttackResult:
        eps = check_epsilon(eps, self.threat)
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if images.min() < 0 or images.max() > 1:
            raise ValueError("images must lie in [0, 1]; normalisation belongs inside the model")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        was_training = model.training
        model.eval()
        traced_eps = float("inf") if self.threat == "none" else eps
        # a fresh Module starts in training mode; libraries such as torchattacks read the
        # wrapper's mode and "restore" it afterwards, which would put BatchNorm in training mode
        counter = AttackTracer(model, images, labels, traced_eps, self.threat).eval()
        devices = [images.device] if images.device.type == "cuda" else []
        seed = self.seed if seed is None else int(seed)
        context = context if context is not None else RunContext()
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                result = self.run(counter, images, labels, eps, seed=seed, context=context)
        finally:
            model.train(was_training)
        result.adv = result.adv.detach().clamp(0, 1)
        result.forward_passes += counter.forward_passes
        result.backward_passes += counter.backward_passes
        if result.loss_trace is None:
            result.loss_trace = counter.loss_trace()
        if result.any_iterate_adversarial is None:
            result.any_iterate_adversarial = counter.any_adversarial.cpu()
            result.best_iterate = counter.best
        return result

    # provenance ----------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-able configuration (part of the cell key)."""
        return {"attack": type(self).__name__, "threat": self.threat, "seed": self.seed,
                **_jsonable(self.options)}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in sorted(self.config().items()) if k != "attack")
        return f"{type(self).__name__}({opts})"


def check_epsilon(eps: float, threat: str) -> float:
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"epsilon must be a number, got {eps!r}") from None
    if math.isnan(eps) or math.isinf(eps) or eps < 0:
        raise ValueError(f"epsilon must be a finite number >= 0, got {eps}; e.g. 8/255 for Linf "
                         "on CIFAR-10 or 0.5 for L2")
    if threat == "linf" and eps > 1:
        raise ValueError(f"Linf epsilon {eps} exceeds the [0, 1] image range; did you mean "
                         f"{eps}/255 = {eps / 255:.5f}?")
    return eps


def perturbation_norm(adv: torch.Tensor, images: torch.Tensor, threat: str) -> torch.Tensor:
    d = (adv - images).flatten(1)
    if threat == "l2":
        return d.norm(p=2, dim=1)
    return d.abs().amax(dim=1)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = list(v)
        elif isinstance(v, dict):
            out[k] = _jsonable(v)
        else:
            out[k] = repr(v)
    return out
