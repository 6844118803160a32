"""Classifier specs -> models: pinned names, ``"<arch>@<recipe>"`` and checkpoint paths.

``"<arch>@<recipe>"`` trains ``arch`` on the dataset's train split with the named recipe the
first time and caches the checkpoint under ``cache_dir()/models/<key>.safetensors``; the key
is a sha256 over everything that determines the weights (arch, dataset, resolution, recipe
fields, the train data's fingerprint), so a later call, in any process, loads instead of
training, and a change of data or recipe trains afresh.

A few ``"<arch>@<recipe>"`` checkpoints come with the project (:data:`SHIPPED`, files in
``bench/models/weights`` with a model card, pinned by sha256): those load without training on
every machine, whatever its copy of the train split (like the shipped defense artifacts), so a
fresh clone's defenses that sit in front of them fit nothing.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.core import paths
from bench.core.hashing import text_sha256
from bench.core.registry import MODELS, RegistryError, create_model
from bench.models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
    state_dict_sha256,
    verify_sha256,
)
from bench.models.pretrained import PRETRAINED, load_pretrained
from bench.models.training import (
    RECIPES,
    TrainRecipe,
    evaluate_accuracy,
    get_recipe,
    train_classifier,
)

log = logging.getLogger(__name__)

#: bump when a change to the training code changes what a recipe produces
TRAINING_VERSION = 1

#: folder of the classifier checkpoints that come with the project
SHIPPED_DIR = Path(__file__).resolve().parent / "weights"

#: (arch, recipe, dataset) -> (file in :data:`SHIPPED_DIR`, its sha256). Each has a model card
#: ``<file>.md`` (recipe, data, wall time, history, measured accuracy).
SHIPPED: dict[tuple[str, str, str], tuple[str, str]] = {
    # the undefended ImageNet-10 classifier at 64 px (73.0% on 1,000 test images): what the
    # semantic AE, the AAE detector and the transform baselines sit in front of on ImageNet-10
    ("resnet20_s2", "standard", "imagenet10"): (
        "resnet20_s2-imagenet10-64px-standard.safetensors",
        "57ead2687725046eb0142ddcbb2aff28d0e8b55908b55ec196e7fb1e43e2d02f"),
}


def shipped_classifier(arch: str, recipe: str, dataset: str) -> Path | None:
    """The verified shipped checkpoint of ``arch@recipe`` on ``dataset``, or None."""
    entry = SHIPPED.get((arch, recipe, dataset))
    if entry is None:
        return None
    filename, sha = entry
    path = SHIPPED_DIR / filename
    if not path.is_file():
        raise CheckpointError(f"shipped classifier {path} is missing; restore it (`git checkout "
                              f"-- bench/models/weights/{filename}`)")
    try:
        verify_sha256(path, sha)
    except CheckpointError:
        raise CheckpointError(f"shipped classifier {filename} does not match its pinned sha256 "
                              f"{sha[:12]}...; restore it (`git checkout -- "
                              f"bench/models/weights/{filename}`)") from None
    return path


def classifier_cache_key(arch: str, dataset: str, recipe: TrainRecipe, train_fingerprint: str,
                         resolution: int | None) -> str:
    fields = {k: v for k, v in recipe.to_dict().items() if k != "eval_images"}
    blob = json.dumps({"arch": arch, "dataset": dataset, "resolution": resolution,
                       "recipe": fields, "train_fingerprint": train_fingerprint,
                       "training_version": TRAINING_VERSION}, sort_keys=True)
    return text_sha256(blob)


def _channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the train images (rounded: they go into a config)."""
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def train_and_cache(arch: str, recipe_name: str | TrainRecipe, *, dataset: str,
                    device: str | torch.device = "cpu", progress: bool = False
                    ) -> tuple[nn.Module, str]:
    """The ``"<arch>@<recipe>"`` path: load the cached checkpoint or train and cache one."""
    from bench.data import dataset_info, load_eval, load_train

    MODELS.get(arch)  # unknown arch: RegistryError with "did you mean"
    if isinstance(recipe_name, str):
        shipped = shipped_classifier(arch, recipe_name, dataset)
        if shipped is not None:
            model, _ = load_checkpoint(shipped, device=device)
            return model, sha256_file(shipped)
    recipe = get_recipe(recipe_name, dataset)
    info = dataset_info(dataset)
    resolution = recipe.resolution or info.image_size
    res_kw = {"resolution": recipe.resolution} if recipe.resolution else {}
    train = load_train(dataset, limit=recipe.limit, seed=recipe.seed, progress=progress, **res_kw)
    key = classifier_cache_key(arch, dataset, recipe, train.fingerprint, resolution)
    path = paths.cache_dir() / "models" / f"{key}.safetensors"
    if path.is_file():
        try:
            model, _ = load_checkpoint(path, device=device)
            return model, sha256_file(path)
        except CheckpointError as exc:
            log.warning("cached classifier %s is unusable (%s); training it again", path, exc)

    name = recipe_name if isinstance(recipe_name, str) else "custom"
    log.info("training %s@%s on %s (%d images); cached as %s", arch, name, dataset, len(train),
             path)
    mean, std = _channel_stats(train.images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = create_model(arch, num_classes=info.num_classes, mean=mean, std=std)
    import time

    t0 = time.perf_counter()
    train_classifier(model, train, recipe=recipe, device=device, progress=progress)
    seconds = time.perf_counter() - t0
    accuracy = None
    if recipe.eval_images:
        test = load_eval(dataset, recipe.eval_images, seed=0, split="test", **res_kw)
        accuracy = {"split": "test", "n": len(test), "source": test.source,
                    "fingerprint": test.fingerprint,
                    "clean_accuracy": evaluate_accuracy(model, test, device=device)}
    config = {"arch": arch, "num_classes": info.num_classes, "dataset": dataset,
              "resolution": resolution, "recipe_name": name, "recipe": recipe.to_dict(),
              "train_fingerprint": train.fingerprint, "train_source": train.source,
              "train_size": min(len(train), recipe.limit or len(train)),
              "training_version": TRAINING_VERSION, "accuracy": accuracy,
              "train_seconds": round(seconds, 1),
              "history": getattr(model, "train_history", []), "torch": torch.__version__}
    model.cpu()
    sha = save_checkpoint(model, path, config)
    return model.to(device).eval(), sha


def _candidates() -> list[str]:
    return sorted(PRETRAINED) + [f"{a}@{r}" for a in MODELS.list() for r in RECIPES]


def _unknown(spec: str) -> RegistryError:
    close = difflib.get_close_matches(spec, _candidates(), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return RegistryError(
        f"unknown classifier '{spec}'{hint} (a pinned name: {', '.join(sorted(PRETRAINED))}; "
        "'<arch>@<recipe>' with recipe " + "|".join(RECIPES) + "; or a checkpoint path)")


def load_classifier(spec: str | os.PathLike, *, dataset: str, device: str | torch.device = "cpu",
                    progress: bool = False) -> tuple[nn.Module, str]:
    """``(model in eval mode on device, sha256)`` for a classifier spec: a pinned name
    (``akamaster-resnet20``; sha256 of the pinned file), ``"<arch>@<recipe>"`` (trained and
    cached; sha256 of the cached checkpoint) or a path to a :func:`save_checkpoint` file."""
    spec_str = os.fspath(spec)
    if spec_str in PRETRAINED:
        entry = PRETRAINED[spec_str]
        if entry.dataset != dataset:
            raise ValueError(f"classifier '{spec_str}' is a {entry.dataset} model; it cannot "
                             f"classify {dataset}")
        return load_pretrained(entry, device=device, progress=progress)
    path = Path(spec_str).expanduser()
    if path.is_file() or spec_str.endswith((".safetensors", ".th", ".pth", ".pt")):
        if not path.is_file():
            raise FileNotFoundError(f"classifier checkpoint {path} does not exist")
        model, cfg = load_checkpoint(path, device=device)
        if cfg.get("dataset") not in (None, dataset):
            raise ValueError(f"checkpoint {path} was trained on {cfg['dataset']}, not {dataset}")
        return model, sha256_file(path)
    if spec_str.count("@") == 1:
        arch, recipe = spec_str.split("@")
        if arch not in MODELS or recipe not in RECIPES:
            raise _unknown(spec_str)
        return train_and_cache(arch, recipe, dataset=dataset, device=device, progress=progress)
    raise _unknown(spec_str)


def resolve_classifier(spec_or_module: str | os.PathLike | nn.Module, *, dataset: str,
                       device: str | torch.device = "cpu", progress: bool = False
                       ) -> tuple[nn.Module, str]:
    """Like :func:`load_classifier`, but an ``nn.Module`` passes through unchanged, with the
    sha256 of its state dict."""
    if isinstance(spec_or_module, nn.Module):
        return spec_or_module, state_dict_sha256(spec_or_module)
    return load_classifier(spec_or_module, dataset=dataset, device=device, progress=progress)


def describe_classifier(spec: str) -> dict[str, Any]:
    """What a spec refers to, without loading weights (for listings)."""
    if spec in PRETRAINED:
        return PRETRAINED[spec].config()
    if spec.count("@") == 1:
        arch, recipe = spec.split("@")
        return {"arch": arch, "recipe_name": recipe, "recipe": get_recipe(recipe).to_dict(),
                "shipped_for": sorted(d for (a, r, d) in SHIPPED if (a, r) == (arch, recipe))}
    raise _unknown(spec)
