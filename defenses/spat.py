"""SPAT (semantics-preserving adversarial training) and PGD adversarial training, one code path.

Source: "Semantics-Preserving Adversarial Training", Lee, Lee, Lee (arXiv 2009.10978); the
baseline is Madry et al.'s PGD adversarial training. See ``../shared/METHODS.md`` section 3.

* [known] SPAT puts the training-time perturbation on pixels SHARED AMONG ALL CLASSES, so that
  adversarial examples used for training do not move toward another class.
* [reconstruction] Shared-pixel weights (:func:`shared_pixel_weights`): for each input, the
  input-gradient magnitude of every class logit S_k = |grad_x z_k(x)|, min-max normalised per
  sample to [0, 1]; W = min over k of S_k, renormalised per sample to [0, 1]. Element-wise (per
  channel and pixel) by default; ``spat_reduce_channels=True`` takes the max over channels
  first (one weight per pixel). With many classes a random subset of ``spat_classes`` classes
  per batch keeps the cost bounded (the min is then over that subset). A constant S_k (no
  information, e.g. a dead logit) normalises to all ones, so it never restricts W.
  ``spat_normalise="rank"`` (NOT the default) replaces the final min-max renormalisation by
  the per-sample percentile rank of min_k S_k: the same ordering of shared pixels, but W is
  uniform on [0, 1] (mean 0.5). With min-max, W is very peaked (measured mean ~0.065 on
  CIFAR-10 ResNet-20), so SPAT's steps are ~15x smaller than PGD's; this knob is there to
  test that reading cheaply.
* [reconstruction] Each PGD step is multiplied element-wise by W:
  delta <- clip_eps(delta + alpha * sign(g) * W), then x + delta is clipped to [0, 1]. The
  random start is the same as PGD's (uniform in the eps ball, unweighted). Train on the
  cross-entropy of the model on x + delta.

:func:`adversarial_train` is the ONE training routine: ``method="pgd"`` and ``method="spat"``
differ only in the weight W passed to :func:`pgd_perturb` (None, i.e. all ones, for PGD), so
the two compare fairly with the same architecture, attack budget, data and schedule. It also
takes an ``extra_loss`` hook (on the penultimate features of the adversarial batch), which the
SRD purifier uses for its latent-distribution loss instead of a second training loop.

Presets (:data:`AT_PRESETS`; explicit knobs win):

* ``tiny``: seconds on a CPU (test-suite, ``smoke`` runs).
* ``quick``: "fast" adversarial training (Wong et al. 2020): ONE step of size 1.25 eps from a
  random start, a 5,000-image balanced subset of the train split, one-cycle learning rate
  (peak 0.05), 2 epochs, ResNet-20 (CIFAR-10), FINE-TUNING the pinned clean
  ``akamaster-resnet20`` weights (``init="auto"``; from scratch, this budget leaves both
  methods near 25% clean accuracy). A few minutes on 2 CPU cores (SPAT is slower: its weights
  cost one backward pass per class; see ``spat_classes``).
* ``full``: PGD-10 (step eps/4, random start), the whole train split, 40 epochs with a one-cycle
  learning rate, PreAct ResNet-18 on CIFAR-10 (ResNet-18 on ImageNet-10): GPU scale.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bench.core.hashing import json_sha256
from bench.core.registry import DEFENSES
from defenses.base import Defense

#: training presets; ``step_size_factor`` is the PGD step as a fraction of eps
_COMMON = {"precision": "fp32", "val_images": 0, "val_steps": 10}
AT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"steps": 1, "step_size_factor": 1.25, "random_start": True, "epochs": 3,
             "batch_size": 64, "lr": 0.1, "weight_decay": 5e-4, "schedule": "onecycle",
             "train_limit": None, "spat_classes": None, **_COMMON},
    "quick": {"steps": 1, "step_size_factor": 1.25, "random_start": True, "epochs": 2,
              "batch_size": 128, "lr": 0.05, "weight_decay": 5e-4, "schedule": "onecycle",
              "train_limit": 5000, "spat_classes": None, **_COMMON},
    # the CPU reference scale (EVALUATION.md "Scales"): fast AT on the whole train split in
    # bfloat16 autocast, a held-out PGD-10 check every epoch, the best epoch kept, resumable
    "standard": {"steps": 1, "step_size_factor": 1.25, "random_start": True, "epochs": 10,
                 "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4, "schedule": "onecycle",
                 "train_limit": None, "spat_classes": 3, "precision": "bf16",
                 "val_images": 500, "val_steps": 10},
    "full": {"steps": 10, "step_size_factor": 0.25, "random_start": True, "epochs": 40,
             "batch_size": 128, "lr": 0.2, "weight_decay": 5e-4, "schedule": "onecycle",
             "train_limit": None, "spat_classes": None, **_COMMON, "val_images": 1000},
}

#: per-(dataset, preset) changes to :data:`AT_PRESETS` (explicit knobs still win): ImageNet-10
#: here has 3,000 train images (300 per class), so its `standard` fit holds out fewer, uses
#: smaller batches (more steps) and more epochs, from scratch
DATASET_PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("imagenet10", "standard"): {"epochs": 40, "batch_size": 64, "val_images": 300},
}

#: architecture per (dataset, preset); a dataset's ``None`` entry is its default
DEFAULT_ARCH: dict[str, dict[str | None, str]] = {
    "cifar10": {None: "resnet20", "full": "preact_resnet18"},
    "imagenet10": {None: "resnet18_imagenet", "standard": "resnet20_s2"},
    "test_tiny": {None: "test_tiny_cnn"},
}

METHODS = ("pgd", "spat")
PRECISIONS = ("fp32", "bf16")


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """The precision a fit actually runs at: "bf16" asks for bfloat16 autocast, which is fast
    only where the hardware has it (a GPU, or a CPU with AVX512-BF16/AMX); on a CPU without it
    oneDNN emulates bf16 convolutions about 70x slower than fp32 (measured: 30 s against about
    0.4 s per ResNet-20 fast-AT step on an AVX2 EPYC), so there it runs at fp32 and says so.
    The artifact's recipe keeps what was asked; ``fit_info["precision_used"]`` records this."""
    if precision == "bf16" and torch.device(device).type == "cpu" and \
            not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        import warnings

        warnings.warn("precision 'bf16' asked for, but this CPU has no native bfloat16 "
                      "(AVX512-BF16/AMX): training at fp32 instead (emulated bf16 is ~70x "
                      "slower)", RuntimeWarning, stacklevel=2)
        return "fp32"
    return precision

#: clean pretrained weights that ``init="auto"`` fine-tunes from, except with preset "full"
#: (which trains from scratch, the standard recipe)
AUTO_INIT: dict[tuple[str, str], str] = {("cifar10", "resnet20"): "akamaster-resnet20"}


def resolve_init(init: str | None, dataset: str, arch: str, preset: str | None) -> str | None:
    if init != "auto":
        return init
    return None if preset == "full" else AUTO_INIT.get((dataset, arch))


def load_init_weights(model: nn.Module, init: str, dataset: str, device) -> str:
    """Copy the weights of classifier spec ``init`` (same architecture) into ``model``."""
    from bench.models import resolve_classifier

    source, sha = resolve_classifier(init, dataset=dataset, device=device)
    arch = getattr(model, "arch", None)
    if getattr(source, "arch", arch) != arch:
        raise ValueError(f"init={init!r} is a {getattr(source, 'arch', '?')} but the defense "
                         f"trains a {arch}; pass init=None or a classifier of the same arch")
    model.load_state_dict(source.state_dict())
    return sha


def default_arch(dataset: str, preset: str | None = None) -> str:
    table = DEFAULT_ARCH.get(dataset)
    if table is None:
        raise ValueError(f"no default architecture for dataset {dataset!r}: pass arch= "
                         f"(e.g. 'resnet20')")
    return table.get(preset, table[None])


def resolve_preset(preset: str, overrides: dict[str, Any], table: dict[str, dict[str, Any]] = AT_PRESETS
                   ) -> dict[str, Any]:
    """The preset's settings with the non-None ``overrides`` applied."""
    if preset not in table:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(table)}")
    out = dict(table[preset])
    out.update({k: v for k, v in overrides.items() if v is not None})
    return out


# ------------------------------------------------------------------------------------ weights
def _minmax(s: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max normalisation to [0, 1]; a constant sample becomes all ones."""
    flat = s.flatten(1)
    lo = flat.min(1, keepdim=True).values
    hi = flat.max(1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 1e-12, (flat - lo) / span.clamp_min(1e-12), torch.ones_like(flat))
    return out.view_as(s)


def _rank(s: torch.Tensor) -> torch.Tensor:
    """Per-sample percentile rank in [0, 1] (ties broken by position)."""
    flat = s.flatten(1)
    ranks = flat.argsort(1).argsort(1).to(s.dtype)
    return (ranks / max(1, flat.shape[1] - 1)).view_as(s)


def _mean_one(s: torch.Tensor, cap: float, floor: float) -> torch.Tensor:
    """Per-sample rescaling to mean 1, capped at ``cap``, mixed with a uniform ``floor``:
    ``floor + (1 - floor) * min(s / mean(s), cap)`` renormalised to mean 1 again. The step
    budget (mean |step|) equals PGD's; the weights only move it between pixels."""
    flat = s.flatten(1)
    mean = flat.mean(1, keepdim=True)
    w = torch.where(mean > 1e-12, flat / mean.clamp_min(1e-12), torch.ones_like(flat))
    w = w.clamp(max=float(cap))
    w = w / w.mean(1, keepdim=True).clamp_min(1e-12)
    w = float(floor) + (1.0 - float(floor)) * w
    return w.view_as(s)


WEIGHT_NORMALISERS = ("minmax", "rank", "mean1")


def shared_pixel_weights(model: nn.Module, x: torch.Tensor, *, classes: list[int] | None = None,
                         reduce_channels: bool = False, normalise: str = "minmax",
                         cap: float = 4.0, floor: float = 0.25) -> torch.Tensor:
    """SPAT's shared-pixel weights W, same shape as ``x`` [reconstruction].

    S_k = |grad_x z_k(x)| per class logit k (in ``classes``, default all), min-max normalised
    per sample; W = min_k S_k, then per sample (``normalise``): "minmax" renormalises to
    [0, 1] (the raw shared-pixel map; as a step weight it SHRINKS the attack, mean ~0.07 on
    CIFAR-10), "rank" takes the percentile rank (uniform on [0, 1]), "mean1" (the training
    default) rescales to mean 1 capped at ``cap`` and mixed with a uniform ``floor``
    (:func:`_mean_one`), so a step weighted by W has PGD's budget, redistributed onto the
    shared pixels. One forward and one backward pass per class. Call with the model in eval
    mode (batch-norm statistics in train mode couple the samples of a batch).
    """
    if normalise not in WEIGHT_NORMALISERS:
        raise ValueError(f"normalise must be one of {WEIGHT_NORMALISERS}, got {normalise!r}")
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        ks = list(range(logits.shape[1])) if classes is None else list(classes)
        W = None
        for i, k in enumerate(ks):
            g = torch.autograd.grad(logits[:, k].sum(), x, retain_graph=i < len(ks) - 1)[0].abs()
            if reduce_channels:
                g = g.amax(1, keepdim=True)
            s = _minmax(g)
            W = s if W is None else torch.minimum(W, s)
    if normalise == "minmax":
        W = _minmax(W)
    elif normalise == "rank":
        W = _rank(W)
    else:
        W = _mean_one(W, cap, floor)
    return W.expand_as(x).contiguous() if reduce_channels else W


# ------------------------------------------------------------------------------------ attack
def pgd_perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int,
                step_size: float, random_start: bool = True, weight: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Linf PGD on the cross-entropy: returns delta with |delta| <= eps and x + delta in [0, 1].

    ``weight`` (same shape as x, in [0, 1]) multiplies every step element-wise: None is plain
    PGD (Madry et al.), SPAT's shared-pixel weights make it SPAT's attack. The random start
    draws from ``generator`` (CPU) so training is reproducible.
    """
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        delta = (2.0 * noise - 1.0) * eps
    else:
        delta = torch.zeros_like(x)
    delta = (x + delta).clamp(0.0, 1.0) - x
    for _ in range(int(steps)):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x + delta), y)
            g = torch.autograd.grad(loss, delta)[0]
        step = step_size * g.sign()
        if weight is not None:
            step = step * weight
        delta = (delta.detach() + step).clamp(-eps, eps)
        delta = (x + delta).clamp(0.0, 1.0) - x
    return delta.detach()


# ------------------------------------------------------------------------------------ training
def _final_linear(model: nn.Module) -> nn.Linear | None:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


def _augment(images: torch.Tensor, padding: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    from bench.models.training import augment

    return augment(images, padding=padding, flip=flip, generator=gen)


def _balanced_subset(labels: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    from bench.models.training import balanced_subset

    return balanced_subset(labels, limit, seed=seed)


def images_and_labels(train: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a :class:`bench.data.LabeledImages` or an ``(images, labels)`` pair."""
    if isinstance(train, (tuple, list)):
        images, labels = train
    else:
        images, labels = train.images, train.labels
    return images.float(), labels.long()


def _robust_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
                     steps: int, batch_size: int = 250, seed: int = 0) -> tuple[float, float]:
    """(clean, PGD-``steps``) accuracy of ``model`` on a held-out set, in fp32, eval mode: the
    per-epoch guard against catastrophic overfitting (Wong et al. 2020)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    clean = robust = 0
    for i in range(0, len(labels), batch_size):
        x, y = images[i:i + batch_size], labels[i:i + batch_size]
        with torch.no_grad():
            clean += int((model(x).argmax(1) == y).sum())
        delta = pgd_perturb(model, x, y, eps=eps, steps=steps, step_size=eps / 4,
                            random_start=True, generator=gen)
        with torch.no_grad():
            robust += int((model(x + delta).argmax(1) == y).sum())
    n = max(1, len(labels))
    return clean / n, robust / n


def adversarial_train(model: nn.Module, train: Any, *, method: str = "pgd", eps: float,
                      steps: int, step_size: float, random_start: bool = True, epochs: int,
                      batch_size: int = 128, lr: float = 0.1, momentum: float = 0.9,
                      weight_decay: float = 5e-4, schedule: str = "onecycle",
                      crop_padding: int = 4, flip: bool = True, train_limit: int | None = None,
                      spat_classes: int | None = None, spat_reduce_channels: bool = False,
                      spat_normalise: str = "minmax", spat_cap: float = 4.0,
                      spat_floor: float = 0.25,
                      attack_mode: str = "eval", seed: int = 0, precision: str = "fp32",
                      val: tuple[torch.Tensor, torch.Tensor] | None = None,
                      val_steps: int = 10, checkpoint: str | Path | None = None,
                      fingerprint: str = "",
                      device: str | torch.device = "cpu", progress: bool = True,
                      extra_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None],
                                           torch.Tensor] | None = None,
                      aux: torch.Tensor | None = None, desc: str | None = None
                      ) -> list[dict[str, float]]:
    """Adversarial training of ``model`` in place: PGD-AT (``method="pgd"``) or SPAT (``"spat"``).

    The two methods run this same loop; the only difference is that SPAT computes
    :func:`shared_pixel_weights` for each batch and passes them to :func:`pgd_perturb` (PGD
    passes None). Each batch: random crop + flip (``crop_padding``, ``flip``), the attack
    (model in eval mode when ``attack_mode="eval"``, the default, so batch-norm statistics
    neither couple the samples nor drift with adversarial inputs; ``"train"`` attacks in
    train mode), then one SGD step (momentum, Nesterov, no weight decay on 1-d parameters)
    on the cross-entropy of x + delta, plus ``extra_loss(features, labels, aux_batch)`` when
    given: ``features`` are the adversarial batch's penultimate features (captured at the
    input of the model's last ``nn.Linear``, the zoo's ``features(x)``), ``aux`` is any
    per-sample tensor (sliced with the batch). Learning-rate schedule per step: ``onecycle``
    (linear warm-up over the first quarter, then linear decay), ``cosine`` or ``piecewise``
    (x0.1 at 50% and 75%). ``spat_classes``: compute W over a random subset of that many
    classes per batch (None: all). Seeded end to end by ``seed`` (shuffle, augmentation,
    random starts, class subsets).

    ``precision="bf16"`` runs the training attack and step under CPU/GPU autocast in bfloat16
    (about 3x faster on a CPU with AVX-512 BF16; the held-out check stays fp32). ``val`` is a
    held-out ``(images, labels)`` set: after every epoch its clean and PGD-``val_steps``
    accuracy are measured and the model ends with the weights of the epoch with the best
    PGD accuracy (the guard against catastrophic overfitting). ``checkpoint``: a file that
    holds model, optimizer, RNG states, epoch, history and best weights, written atomically
    after every epoch; a fit started with the same ``fingerprint`` resumes from it and ends
    with the same weights as an uninterrupted fit (on a CPU). Returns the per-epoch history;
    the model ends in eval mode.
    """
    from bench.models.training import load_training_state, save_training_state

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if schedule not in ("onecycle", "cosine", "piecewise"):
        raise ValueError(f"schedule must be 'onecycle', 'cosine' or 'piecewise', got {schedule!r}")
    if attack_mode not in ("eval", "train"):
        raise ValueError(f"attack_mode must be 'eval' or 'train', got {attack_mode!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if eps < 0 or steps < 0 or epochs < 1 or batch_size < 1:
        raise ValueError("eps and steps must be >= 0, epochs and batch_size >= 1")
    device = torch.device(device)
    images, labels = images_and_labels(train)
    if aux is not None and len(aux) != len(labels):
        raise ValueError(f"aux has {len(aux)} entries for {len(labels)} training images")
    if train_limit is not None and len(labels) > train_limit:
        keep = _balanced_subset(labels, int(train_limit), seed)
        images, labels = images[keep], labels[keep]
        aux = aux[keep] if aux is not None else None
    images, labels = images.to(device), labels.to(device)
    aux = aux.to(device) if aux is not None else None
    if val is not None:
        val = (val[0].float().to(device), val[1].long().to(device))
    num_classes = int(getattr(model, "num_classes", 0) or int(labels.max()) + 1)
    n = len(labels)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(seed)
    model.to(device)
    precision = resolve_precision(precision, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, momentum=momentum, nesterov=momentum > 0)

    def lr_at(i: int) -> float:
        frac = i / max(1, total)
        if schedule == "onecycle":
            warm = 0.25
            return lr * (frac / warm if frac < warm else max(0.0, (1 - frac) / (1 - warm)))
        if schedule == "cosine":
            return 0.5 * lr * (1 + math.cos(math.pi * frac))
        return lr * (0.1 ** ((frac >= 0.5) + (frac >= 0.75)))

    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"epoch": 0, "score": -1.0, "state": None}
    start_epoch = 0
    if checkpoint is not None:
        state = load_training_state(checkpoint, fingerprint)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            history = list(state["history"])
            best = dict(state["best"])
            start_epoch = int(state["epoch"])

    captured: dict[str, torch.Tensor] = {}
    handle = None
    if extra_loss is not None:
        head = _final_linear(model)
        if head is not None:
            handle = head.register_forward_pre_hook(
                lambda _m, inp: captured.__setitem__("features", inp[0]))

    label = desc or f"{method}-AT {getattr(model, 'arch', type(model).__name__)}"
    bar = tqdm(total=total, initial=start_epoch * steps_per_epoch, desc=label, unit="step",
               disable=not progress, leave=False)
    it = start_epoch * steps_per_epoch
    shown: dict[str, str] = {}
    if history:
        last = history[-1]
        shown = {k: f"{last[k]:.3f}" for k in ("val_clean", "val_pgd") if k in last}
    try:
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            order = torch.randperm(n, generator=gen).to(device)
            sums = {"loss": 0.0, "extra": 0.0, "correct": 0, "weight_mean": 0.0}
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                x = _augment(images[idx], crop_padding, flip, gen)
                y = labels[idx]
                if attack_mode == "eval":
                    model.eval()
                weight = None
                with autocast:
                    if method == "spat":
                        classes = None
                        if spat_classes is not None and spat_classes < num_classes:
                            classes = torch.randperm(num_classes,
                                                     generator=gen)[:spat_classes].tolist()
                        weight = shared_pixel_weights(
                            model, x, classes=classes, reduce_channels=spat_reduce_channels,
                            normalise=spat_normalise, cap=spat_cap, floor=spat_floor).float()
                        sums["weight_mean"] += float(weight.mean()) * len(y)
                    delta = pgd_perturb(model, x, y, eps=eps, steps=steps, step_size=step_size,
                                        random_start=random_start, weight=weight, generator=gen)
                model.train()
                for group in opt.param_groups:
                    group["lr"] = lr_at(it)
                x_adv = x + delta
                with autocast:
                    logits = model(x_adv)
                    loss = F.cross_entropy(logits.float(), y)
                    if extra_loss is not None:
                        feats = captured.pop("features", None)
                        if feats is None:
                            feats = model.features(x_adv)
                        extra = extra_loss(feats.float(), y, aux[idx] if aux is not None else None)
                        sums["extra"] += float(extra.detach()) * len(y)
                        loss = loss + extra
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                it += 1
                sums["loss"] += float(loss.detach()) * len(y)
                sums["correct"] += int((logits.detach().argmax(1) == y).sum())
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch + 1}/{epochs}",
                                loss=f"{sums['loss'] / min(n, start + len(y)):.3f}", **shown)
            record = {"epoch": epoch + 1, "loss": sums["loss"] / n,
                      "adv_train_accuracy": sums["correct"] / n,
                      "seconds": time.perf_counter() - t0}
            if extra_loss is not None:
                record["extra_loss"] = sums["extra"] / n
            if method == "spat":
                record["weight_mean"] = sums["weight_mean"] / n
            if val is not None:
                if handle is not None:
                    handle.remove()
                clean, robust = _robust_accuracy(model, *val, eps=eps, steps=val_steps,
                                                 seed=seed + epoch)
                if handle is not None:
                    handle = head.register_forward_pre_hook(
                        lambda _m, inp: captured.__setitem__("features", inp[0]))
                record.update(val_clean=clean, val_pgd=robust)
                shown = {"val_clean": f"{clean:.3f}", "val_pgd": f"{robust:.3f}"}
                if robust >= best["score"]:
                    best = {"epoch": epoch + 1, "score": robust,
                            "state": {k: v.detach().cpu().clone()
                                      for k, v in model.state_dict().items()}}
            history.append(record)
            if progress:
                bar.write(f"{label}: epoch {epoch + 1}/{epochs} loss {record['loss']:.3f} "
                          f"adv-train acc {record['adv_train_accuracy']:.3f}"
                          + (f" | held-out clean {record['val_clean']:.3f} PGD-{val_steps} "
                             f"{record['val_pgd']:.3f}" if val is not None else "")
                          + f" ({record['seconds']:.0f} s)")
            if checkpoint is not None:
                save_training_state(checkpoint, {
                    "fingerprint": fingerprint, "epoch": epoch + 1,
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizer": opt.state_dict(), "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(), "history": history, "best": best})
    finally:
        if handle is not None:
            handle.remove()
        bar.close()
    if val is not None and best["state"] is not None:
        model.load_state_dict(best["state"])
        for rec in history:
            rec["selected"] = rec["epoch"] == best["epoch"]
    model.eval()
    return history


# ------------------------------------------------------------------------------------ defense
def dataset_defaults(dataset: str, resolution: int | None = None) -> tuple[int, float]:
    """(num_classes, default Linf eps) of ``dataset``."""
    from bench.data import dataset_info

    info = dataset_info(dataset, resolution=resolution)
    return info.num_classes, float(info.default_eps["linf"])


def build_model(arch: str, num_classes: int, seed: int, device: str | torch.device) -> nn.Module:
    from bench.models import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(arch, num_classes=num_classes)
    return model.to(device).eval()


class FitStateMixin:
    """A ``fit_done`` buffer in the state dict, so a state dict loaded into a fresh instance
    marks it fitted (the harness also sets ``fitted`` after loading an artifact)."""

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]
        if bool(self.fit_done):  # type: ignore[attr-defined]
            self.fitted = True
        return result


class AdversarialTrainingDefense(FitStateMixin, Defense):
    """A classifier trained adversarially by :func:`adversarial_train` (SPAT or PGD-AT).

    Constructor knobs: ``method`` ("spat" | "pgd"), ``dataset``, ``arch`` (None: resnet20 for
    cifar10, preact_resnet18 for cifar10 with preset "full", resnet18_imagenet for imagenet10,
    test_tiny_cnn for test_tiny), ``eps`` (None: the dataset's Linf default), and training
    knobs that override the ``fit`` preset when not None: ``steps``, ``step_size`` (absolute),
    ``random_start``, ``epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``schedule``,
    ``train_limit``, ``spat_classes``, ``precision`` ("fp32" | "bf16" autocast),
    ``val_images`` (held out of the train split for the per-epoch PGD check; 0: none),
    ``val_steps``; plus ``spat_reduce_channels``, ``spat_normalise`` ("mean1", the default:
    shared-pixel weights rescaled to mean 1, so SPAT's steps have PGD's budget; "minmax" and
    "rank" are the earlier readings), ``spat_cap``, ``spat_floor`` (see
    :func:`shared_pixel_weights`), ``attack_mode``, ``crop_padding``, ``flip``, ``seed``.
    ``resolution`` is the image side (imagenet10). ``init``: a classifier spec of the same
    architecture to start from, None (scratch) or "auto" (:data:`AUTO_INIT` unless the preset
    is "full"), resolved at construction. ``preset`` (given by the harness) selects the
    training settings that ``config()`` records.
    """

    trainable = True

    def __init__(self, *, method: str = "spat", dataset: str = "cifar10", arch: str | None = None,
                 eps: float | None = None, device: str = "cpu", progress: bool = False,
                 preset: str | None = None, resolution: int | None = None,
                 steps: int | None = None, step_size: float | None = None,
                 random_start: bool | None = None, epochs: int | None = None,
                 batch_size: int | None = None, lr: float | None = None,
                 weight_decay: float | None = None, schedule: str | None = None,
                 train_limit: int | None = None, spat_classes: int | None = None,
                 precision: str | None = None, val_images: int | None = None,
                 val_steps: int | None = None,
                 spat_reduce_channels: bool = False, spat_normalise: str = "mean1",
                 spat_cap: float = 4.0, spat_floor: float = 0.25,
                 attack_mode: str = "eval",
                 crop_padding: int | None = None, flip: bool = True, seed: int = 0,
                 init: str | None = "auto") -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        num_classes, default_eps = dataset_defaults(dataset, resolution)
        arch = arch or default_arch(dataset, preset)
        model = build_model(arch, num_classes, seed, device)
        super().__init__(model, num_classes=num_classes)
        self.register_buffer("fit_done", torch.tensor(False))
        self.method = method
        self.dataset = dataset
        self.resolution = resolution
        self.arch = arch
        self.preset = preset
        self.eps = float(default_eps if eps is None else eps)
        self.device_name = str(device)
        self.progress = progress
        if crop_padding is None:
            crop_padding = 2 if dataset == "test_tiny" else 4
        self.overrides = {"steps": steps, "step_size": step_size, "random_start": random_start,
                          "epochs": epochs, "batch_size": batch_size, "lr": lr,
                          "weight_decay": weight_decay, "schedule": schedule,
                          "train_limit": train_limit, "spat_classes": spat_classes,
                          "precision": precision, "val_images": val_images,
                          "val_steps": val_steps}
        self.init = resolve_init(init, dataset, arch, preset)
        if spat_normalise not in WEIGHT_NORMALISERS:
            raise ValueError(f"spat_normalise must be one of {WEIGHT_NORMALISERS}, got "
                             f"{spat_normalise!r}")
        self.knobs = {"spat_reduce_channels": bool(spat_reduce_channels),
                      "spat_normalise": spat_normalise, "spat_cap": float(spat_cap),
                      "spat_floor": float(spat_floor),
                      "attack_mode": attack_mode, "crop_padding": int(crop_padding),
                      "flip": bool(flip), "seed": int(seed)}
        if preset is not None:
            self.training_settings(preset)  # an unknown preset or bad knob fails here, early
        self.history: list[dict[str, float]] = []
        self.fit_info: dict[str, Any] = {}

    def _preset_settings(self, preset: str) -> dict[str, Any]:
        table = AT_PRESETS
        extra = DATASET_PRESETS.get((self.dataset, preset))
        if extra:
            table = {**AT_PRESETS, preset: {**AT_PRESETS[preset], **extra}}
        return resolve_preset(preset, self.overrides, table)

    def training_settings(self, preset: str) -> dict[str, Any]:
        """The resolved settings ``fit`` uses for ``preset`` (absolute step size included)."""
        s = self._preset_settings(preset)
        if s.get("step_size") is None:
            s["step_size"] = s["step_size_factor"] * self.eps
        s.pop("step_size_factor", None)
        if s["precision"] not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {s['precision']!r}")
        if int(s["val_images"]) < 0 or int(s["epochs"]) < 1:
            raise ValueError("epochs must be >= 1 and val_images >= 0 (e.g. epochs=10)")
        return {**s, **self.knobs}

    def fit(self, train: Any, *, preset: str = "quick", device: str | torch.device = "cpu",
            progress: bool = True, checkpoint: str | Path | None = None
            ) -> "AdversarialTrainingDefense":
        """Train on ``train``; with ``checkpoint``, save a resume point every epoch and resume
        from one left by a killed fit of the same configuration."""
        settings = self.training_settings(preset)
        t0 = time.perf_counter()
        init_sha = (load_init_weights(self.classifier, self.init, self.dataset, device)
                    if self.init else None)
        images, labels = images_and_labels(train)
        val = None
        n_val = int(settings.pop("val_images"))
        if n_val > 0:
            held = _balanced_subset(labels, n_val, int(settings["seed"]) + 1)
            mask = torch.ones(len(labels), dtype=torch.bool)
            mask[held] = False
            val = (images[held], labels[held])
            images, labels = images[mask], labels[mask]
        fingerprint = json_sha256(
            {"config": self.config(), "settings": settings, "preset": preset,
             "train": getattr(train, "fingerprint", None), "n": len(labels)})
        self.history = adversarial_train(self.classifier, (images, labels), method=self.method,
                                         eps=self.eps, device=device, progress=progress,
                                         val=val, checkpoint=checkpoint,
                                         fingerprint=fingerprint, **settings)
        self.classifier.eval()
        selected = [r["epoch"] for r in self.history if r.get("selected")]
        self.fit_info = {"preset": preset, "settings": {**settings, "val_images": n_val},
                         "precision_used": resolve_precision(settings["precision"], device),
                         "init": self.init, "init_sha256": init_sha,
                         "seconds": time.perf_counter() - t0,
                         "train_images": min(len(labels), settings["train_limit"] or len(labels)),
                         "selected_epoch": selected[0] if selected else len(self.history),
                         "history": self.history}
        self.fit_done.fill_(True)
        self.fitted = True
        return self

    def config(self) -> dict[str, Any]:
        cfg = {"method": self.method, "dataset": self.dataset, "resolution": self.resolution,
               "arch": self.arch, "eps": self.eps, "init": self.init, **self.overrides,
               **self.knobs}
        if self.preset is not None:
            cfg["settings"] = self._preset_settings(self.preset)
        else:
            cfg["presets"] = AT_PRESETS
        return cfg


def shipped_classifier(dataset: str, resolution: int | None, arch: str,
                              num_classes: int, device, info: dict[str, Any],
                              defense: str = "pgd_at") -> nn.Module:
    """The classifier of the shipped ``standard`` artifact of ``defense`` ("pgd_at" or "spat"),
    sha256-checked: SRD's baseline and initial weights, and a classifier behind a purifier or
    an input transform (:func:`defenses.undefended.behind_classifier`). Records its file and
    sha256 in ``info`` (``baseline``, ``baseline_sha256``)."""
    from safetensors.torch import load_file

    from bench.artifacts import SHIPPED, ArtifactError, verify_shipped

    entry = SHIPPED.get((defense, dataset, resolution, "standard"))
    if entry is None or not entry.path.is_file():
        raise ArtifactError(f"'{defense}' needs the shipped {defense} standard artifact for "
                            f"{dataset} (resolution {resolution}); there is none: fit it "
                            f"(`robustmatrix fit {defense} --dataset {dataset} --preset "
                            f"standard --ship`) or name another classifier")
    verify_shipped(entry)
    state = load_file(str(entry.path))
    prefix = "classifier."
    sub = {key[len(prefix):]: v for key, v in state.items() if key.startswith(prefix)}
    model = build_model(arch, num_classes, 0, device)
    try:
        model.load_state_dict(sub)
    except RuntimeError:
        raise ArtifactError(f"shipped artifact {entry.path.name} does not hold a {arch} "
                            "classifier; use init=None or the architecture it was trained "
                            "with") from None
    model.arch = arch
    info["baseline"] = f"shipped {entry.path.name}"
    info["baseline_sha256"] = entry.sha256
    return model.eval()


# ------------------------------------------------------------------------------------ registry
def _named(defense: Defense, name: str) -> Defense:
    defense.registry_name = name  # for error messages ("robustmatrix fit <name>")
    return defense


@DEFENSES.register("spat")
def spat(**kwargs: Any) -> AdversarialTrainingDefense:
    """SPAT: adversarial training with perturbations on pixels shared among all classes."""
    return _named(AdversarialTrainingDefense(method="spat", **kwargs), "spat")


@DEFENSES.register("pgd_at")
def pgd_at(**kwargs: Any) -> AdversarialTrainingDefense:
    """PGD adversarial training (Madry et al.), the same loop and budget as ``spat``."""
    return _named(AdversarialTrainingDefense(method="pgd", **kwargs), "pgd_at")


_TINY = {"dataset": "test_tiny", "epochs": 1, "train_limit": 200, "batch_size": 50}


@DEFENSES.register("test_spat")
def test_spat(**kwargs: Any) -> AdversarialTrainingDefense:
    """Tiny SPAT on ``test_tiny`` for the test-suite (seconds)."""
    return _named(spat(**{**_TINY, **kwargs}), "test_spat")


@DEFENSES.register("test_pgd_at")
def test_pgd_at(**kwargs: Any) -> AdversarialTrainingDefense:
    """Tiny PGD-AT on ``test_tiny`` for the test-suite (seconds)."""
    return _named(pgd_at(**{**_TINY, **kwargs}), "test_pgd_at")
