"""The training recipe: SGD with momentum, a one-cycle or cosine schedule, random-crop +
horizontal-flip augmentation done on the device, seeded end to end.

Named recipes (``RECIPES``) are what ``"<arch>@<recipe>"`` classifier specs refer to:

* ``tiny``  - ``test_tiny_cnn`` on ``test_tiny``: a few seconds on a CPU.
* ``quick`` - ResNet-20 on a 10,000-image balanced subset of the CIFAR-10 train split, 3 epochs
  (237 steps of 128 images, roughly 0.7 s each on 2 idle CPU cores: about 3 minutes; much
  longer when other jobs share the cores). A development classifier, not a strong one: 53.9%
  on 1,000 JPEG test images.
* ``standard`` - the CPU reference scale (EVALUATION.md "Scales"): all of the train split, 10
  epochs on CIFAR-10; on ImageNet-10 (3,000 train images at 64 px here) 40 epochs of batches
  of 64 (:data:`DATASET_RECIPES`), about 10 minutes for ``resnet20_s2`` on 2 CPU cores. The
  ImageNet-10 ``resnet20_s2@standard`` checkpoint is shipped (:data:`bench.models.zoo.SHIPPED`).
* ``full``  - all of the train split, 40 epochs: GPU scale.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bench.models.checkpoint import CheckpointError


@dataclass(frozen=True)
class TrainRecipe:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1                # peak learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"     # "onecycle" | "cosine"
    crop_padding: int = 4          # random crop after zero padding; 0 disables
    flip: bool = True              # random horizontal flip
    limit: int | None = None       # max train images (balanced subsample), for CPU budgets
    seed: int = 0
    label_smoothing: float = 0.0
    resolution: int | None = None  # train (and evaluate) at this size; None: the dataset's own
    eval_images: int = 1000        # test images scored after training (stored in the checkpoint)

    def __post_init__(self) -> None:
        if self.schedule not in ("onecycle", "cosine"):
            raise ValueError(f"schedule must be 'onecycle' or 'cosine', got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPES: dict[str, TrainRecipe] = {
    "tiny": TrainRecipe(epochs=3, batch_size=128, lr=0.1, weight_decay=5e-4, crop_padding=2,
                        eval_images=200),
    "quick": TrainRecipe(epochs=3, batch_size=128, lr=0.2, weight_decay=5e-4, limit=10_000),
    "standard": TrainRecipe(epochs=10, batch_size=128, lr=0.1, weight_decay=5e-4),
    "full": TrainRecipe(epochs=40, batch_size=256, lr=0.2, weight_decay=5e-4),
}

#: per-(dataset, recipe) replacements of :data:`RECIPES`: ImageNet-10 here has 3,000 train
#: images (300 per class), so its ``standard`` recipe uses smaller batches and more epochs (the
#: budget of the shipped adversarially trained ImageNet-10 models, defenses/spat.py)
DATASET_RECIPES: dict[tuple[str, str], TrainRecipe] = {
    ("imagenet10", "standard"): TrainRecipe(epochs=40, batch_size=64, lr=0.1, weight_decay=5e-4),
}


def get_recipe(recipe: str | TrainRecipe, dataset: str | None = None) -> TrainRecipe:
    """The recipe named ``recipe`` (with ``dataset``'s replacement, if it has one)."""
    if isinstance(recipe, TrainRecipe):
        return recipe
    if (dataset, recipe) in DATASET_RECIPES:
        return DATASET_RECIPES[(dataset, recipe)]
    if recipe not in RECIPES:
        import difflib

        from bench.core.registry import RegistryError

        close = difflib.get_close_matches(str(recipe), list(RECIPES), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise RegistryError(f"unknown training recipe '{recipe}'{hint} "
                            f"(recipes: {', '.join(RECIPES)})")
    return RECIPES[recipe]


def augment(images: torch.Tensor, *, padding: int, flip: bool,
            generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding) and horizontal flip of a batch, on the batch's device; the
    random draws come from ``generator`` (a CPU generator, so runs are reproducible)."""
    n, _, h, w = images.shape
    out = images
    if padding > 0:
        padded = F.pad(images, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(images.device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(images.device)
        rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        chan = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        out = padded[batch, chan, rows, cols]
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(images.device)
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    return out


def balanced_subset(labels: torch.Tensor, limit: int, *, seed: int = 0) -> torch.Tensor:
    """Sorted indices of about ``limit`` items, equally many per class (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    classes = labels.unique()
    per_class = math.ceil(limit / len(classes))
    picks = []
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return torch.cat(picks)[:limit].sort().values


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, data: Any, *, batch_size: int = 500,
                      device: str | torch.device = "cpu") -> float:
    """Clean accuracy (a fraction) of ``model`` on a :class:`~bench.data.LabeledImages`."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(data.labels), batch_size):
        x = data.images[i:i + batch_size].to(device)
        y = data.labels[i:i + batch_size].to(device)
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return correct / max(1, len(data.labels))


def train_classifier(model: nn.Module, train: Any, *, recipe: str | TrainRecipe = "quick",
                     device: str | torch.device = "cpu", progress: bool = True,
                     eval_data: Any = None) -> nn.Module:
    """Train ``model`` on ``train`` (a :class:`~bench.data.LabeledImages` in [0, 1]); return
    it in eval mode. The whole train set is moved to ``device`` once and batches are sliced
    there. Shuffling and augmentation draw from a generator seeded with ``recipe.seed``; the
    caller seeds the model's initialisation. With ``eval_data`` the clean accuracy is shown
    after every epoch and kept in ``model.train_history``."""
    recipe = get_recipe(recipe)
    device = torch.device(device)
    model.to(device).train()
    images = train.images.to(device)
    labels = train.labels.to(device)
    if recipe.limit is not None and len(labels) > recipe.limit:
        keep = balanced_subset(train.labels, recipe.limit, seed=recipe.seed).to(device)
        images, labels = images[keep], labels[keep]
    n = len(labels)
    steps_per_epoch = max(1, math.ceil(n / recipe.batch_size))
    total = recipe.epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(recipe.seed)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on BN and biases
    opt = torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.momentum > 0)
    if recipe.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=recipe.lr, total_steps=total, pct_start=0.25,
            anneal_strategy="linear", div_factor=10.0, final_div_factor=100.0,
            cycle_momentum=False)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)

    history: list[dict[str, float]] = []
    bar = tqdm(total=total, desc=f"train {getattr(model, 'arch', type(model).__name__)}",
               unit="step", disable=not progress, leave=False)
    for epoch in range(recipe.epochs):
        order = torch.randperm(n, generator=gen).to(device)
        # running sums stay on the device: no host sync per step
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        for step, start in enumerate(range(0, n, recipe.batch_size)):
            idx = order[start:start + recipe.batch_size]
            x = augment(images[idx], padding=recipe.crop_padding, flip=recipe.flip, generator=gen)
            y = labels[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            bar.update(1)
            if progress and step % 20 == 0:
                seen = min(n, start + recipe.batch_size)
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss_sum) / seen:.3f}",
                                acc=f"{int(correct) / seen:.3f}")
        record = {"epoch": epoch + 1, "loss": float(loss_sum) / n,
                  "train_accuracy": int(correct) / n}
        if eval_data is not None:
            record["eval_accuracy"] = evaluate_accuracy(model, eval_data, device=device)
        bar.set_postfix({k: f"{v:.3f}" if isinstance(v, float) else v for k, v in record.items()})
        history.append(record)
    bar.close()
    model.train_history = history
    return model.eval()


# ------------------------------------------------------------------------- resumable training
class ResumeError(CheckpointError):
    """A resume checkpoint that cannot be used for this fit (one line, with the fix)."""


def save_training_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write a training checkpoint atomically: a temporary file in the same folder, flushed to
    disk, then renamed over ``path``; a kill at any moment leaves the old or the new file."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_training_state(path: str | Path, fingerprint: str) -> dict[str, Any] | None:
    """The training checkpoint at ``path`` (None when there is none). Read with
    ``weights_only=True`` (tensors and plain containers only); a checkpoint written for another
    configuration (``fingerprint``) or an unreadable one is refused with a one-line error."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a damaged file
        raise ResumeError(f"resume checkpoint {path} is unreadable ({type(exc).__name__}); "
                          "delete it to train from the start") from None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        raise ResumeError(f"resume checkpoint {path} was written for a different training "
                          "configuration; delete it (or restore the original options) to "
                          "train from the start")
    return state
