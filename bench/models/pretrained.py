"""Pinned third-party weights: name -> (arch, url, sha256, filename, converter, normalisation).

A file is looked up by name in :func:`bench.core.paths.weights_roots` (``$ROBUSTMATRIX_WEIGHTS``,
``../shared/weights``, ``~/.cache/robustmatrix/weights``); if absent it is downloaded from the
pinned URL into ``cache_dir()/weights``. Either way its sha256 is verified BEFORE the file is
parsed. The legacy formats are torch pickles: they are read with ``torch.load(...,
weights_only=True)``, which restores tensors and plain containers only and refuses any other
object, so no code from the file ever runs.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.core import paths
from bench.models.checkpoint import CheckpointError, ChecksumError, looks_like_html, verify_sha256
from bench.models.layers import IMAGENET_MEAN, IMAGENET_STD


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str = "module."
                  ) -> dict[str, torch.Tensor]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def convert_akamaster(obj: Any) -> dict[str, torch.Tensor]:
    """``{'best_prec1', 'state_dict'}`` saved from a DataParallel model -> our layout."""
    return _strip_prefix(obj["state_dict"] if "state_dict" in obj else obj)


def convert_locuslab_first(obj: Any) -> dict[str, torch.Tensor]:
    """``{'state_dict': [net1, net2, net3], ...}`` (a robust cascade) -> the first net, whose
    ``0.*``, ``2.*``, ``5.*``, ``7.*`` keys sit under ``net.``."""
    state = obj["state_dict"]
    first = state[0] if isinstance(state, (list, tuple)) else state
    return {f"net.{k}": v for k, v in first.items()}


@dataclass(frozen=True)
class PretrainedEntry:
    name: str
    arch: str
    url: str
    sha256: str
    filename: str                       # the name looked up in weights_roots()
    converter: Callable[[Any], dict[str, torch.Tensor]]
    mean: Sequence[float]
    std: Sequence[float]
    dataset: str = "cifar10"
    num_classes: int = 10
    description: str = ""
    license: str = ""
    alt_filenames: tuple[str, ...] = ()   # e.g. the upstream file name
    reported: dict[str, float] = field(default_factory=dict)

    def config(self) -> dict[str, Any]:
        return {"pretrained": self.name, "arch": self.arch, "url": self.url, "sha256": self.sha256,
                "dataset": self.dataset, "num_classes": self.num_classes,
                "arch_kwargs": {"mean": list(self.mean), "std": list(self.std)},
                "license": self.license, "reported": dict(self.reported)}


_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"

PRETRAINED: dict[str, PretrainedEntry] = {e.name: e for e in [
    PretrainedEntry(
        name="akamaster-resnet20", arch="resnet20",
        url=_AKAMASTER + "resnet20-12fca82f.th",
        sha256="12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
        filename="akamaster-resnet20-12fca82f.th", alt_filenames=("resnet20-12fca82f.th",),
        converter=convert_akamaster, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        description="akamaster/pytorch_resnet_cifar10 ResNet-20, standard training",
        license="BSD-2-Clause", reported={"clean_accuracy": 0.9173}),
    PretrainedEntry(
        name="akamaster-resnet56", arch="resnet56",
        url=_AKAMASTER + "resnet56-4bfd9763.th",
        sha256="4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367",
        filename="akamaster-resnet56-4bfd9763.th", alt_filenames=("resnet56-4bfd9763.th",),
        converter=convert_akamaster, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        description="akamaster/pytorch_resnet_cifar10 ResNet-56, standard training",
        license="BSD-2-Clause", reported={"clean_accuracy": 0.9339}),
    PretrainedEntry(
        name="locuslab-cifar-small", arch="locuslab_small_cnn",
        url="https://github.com/locuslab/convex_adversarial/raw/master/models_scaled/"
            "cifar_small_8px.pth",
        sha256="f07c615f58616cbc7667974f146c4baa851bf0e71df8431a150abea8b7901f37",
        filename="locuslab-cifar_small_8px.pth", alt_filenames=("cifar_small_8px.pth",),
        converter=convert_locuslab_first, mean=IMAGENET_MEAN, std=(0.225, 0.225, 0.225),
        description="Wong et al. 2018 provably robust small convnet (Linf 8/255), first net of "
                    "the cascade",
        license="MIT", reported={"verified_robust_error_cascade": 0.7171}),
]}


def weights_file(entry: PretrainedEntry, *, progress: bool = False,
                 download: bool = True) -> Path:
    """The verified local file for ``entry``: found in a weights root, else downloaded."""
    names = (entry.filename, *entry.alt_filenames)
    for root in paths.weights_roots():
        for name in names:
            candidate = root / name
            if candidate.is_file():
                verify_sha256(candidate, entry.sha256)
                return candidate
    if not download:
        raise FileNotFoundError(f"weights for '{entry.name}' not found (looked for "
                                f"{entry.filename} in "
                                f"{', '.join(str(r) for r in paths.weights_roots())})")
    dest_dir = paths.cache_dir() / "weights"
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / entry.filename
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        torch.hub.download_url_to_file(entry.url, str(tmp), progress=progress)
    except Exception as exc:
        if tmp.exists():
            tmp.unlink()
        raise OSError(f"cannot download weights for '{entry.name}' from {entry.url} ({exc}); put "
                      f"{entry.filename} in one of "
                      f"{', '.join(str(r) for r in paths.weights_roots())} "
                      "or set $ROBUSTMATRIX_WEIGHTS") from exc
    try:
        verify_sha256(tmp, entry.sha256)
    except ChecksumError as exc:
        tmp.unlink()
        raise ChecksumError(f"{exc} (downloaded from {entry.url}; the partial file was deleted)"
                            ) from None
    os.replace(tmp, dest)
    return dest


def read_legacy_weights(path: str | os.PathLike) -> Any:
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``);
    call only on a file whose sha256 has been checked."""
    if looks_like_html(path):
        raise CheckpointError(f"cannot load {path}: it is an HTML page, not weights; delete it and "
                              "download it again")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"cannot load {path} safely: it holds objects other than tensors and containers "
            f"({str(exc).splitlines()[0]}); refusing to unpickle arbitrary code") from exc


def load_pretrained(name: str | PretrainedEntry, *, device: str | torch.device = "cpu",
                    progress: bool = False, path: str | os.PathLike | None = None
                    ) -> tuple[nn.Module, str]:
    """Build the pinned model ``name``; return ``(model.eval(), sha256 of the weights file)``.
    ``path`` overrides the lookup with a local copy of the file (still verified)."""
    from bench.core.registry import create_model

    entry = name if isinstance(name, PretrainedEntry) else get_entry(name)
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"weights file {file} for '{entry.name}' does not exist")
        verify_sha256(file, entry.sha256)
    else:
        file = weights_file(entry, progress=progress)
    state = entry.converter(read_legacy_weights(file))
    model = create_model(entry.arch, num_classes=entry.num_classes, mean=entry.mean, std=entry.std)
    # the normalisation buffers come from the catalog, not from the third-party file
    state.update({k: v for k, v in model.state_dict().items() if k.startswith("normalize.")})
    model.load_state_dict(state, strict=True)
    model.pretrained = entry.name
    return model.to(device).eval(), entry.sha256


def get_entry(name: str) -> PretrainedEntry:
    if name not in PRETRAINED:
        import difflib

        from bench.core.registry import RegistryError

        close = difflib.get_close_matches(name, list(PRETRAINED), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise RegistryError(f"unknown pretrained model '{name}'{hint} "
                            f"(pinned: {', '.join(sorted(PRETRAINED))})")
    return PRETRAINED[name]


def list_pretrained(pattern: str = "*") -> list[str]:
    import fnmatch

    return sorted(n for n in PRETRAINED if fnmatch.fnmatch(n, pattern))
