"""Checkpoints: safetensors weights with the model's config in the file's metadata.

A checkpoint is ONE file: the state dict as safetensors, and under the metadata key
``robustmatrix`` a JSON config (``arch``, ``arch_kwargs``, ``num_classes``, ``dataset``,
``recipe``, ``train_fingerprint``, ``accuracy``, ...). Nothing is unpickled, and the file is
identified by its sha256, which results carry as provenance.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.core.hashing import file_sha256 as sha256_file
from bench.core.hashing import state_dict_sha256 as state_dict_sha256

METADATA_KEY = "robustmatrix"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A weights file that cannot be used (wrong format, HTML page, bad config)."""


class ChecksumError(CheckpointError):
    """A weights file whose sha256 is not the expected one."""


def looks_like_html(path: str | os.PathLike) -> bool:
    """True when the file starts like a web page: the classic failure of saving a GitHub
    "blob" page, a login page or an error page in place of the weights."""
    try:
        with open(path, "rb") as f:
            head = f.read(512).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    except OSError:
        return False
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml", b"<!--"))


def _html_hint(path: str | os.PathLike) -> str:
    return ("; it is an HTML page, not weights (a web page saved in place of the file: download "
            "the raw file, e.g. a GitHub '/raw/' URL, not the '/blob/' page)"
            if looks_like_html(path) else "")


def verify_sha256(path: str | os.PathLike, expected: str) -> str:
    """Check ``path`` against ``expected`` (hex); return the actual hash or raise
    :class:`ChecksumError` with a one-line message naming the file, both hashes and the fix."""
    actual = sha256_file(path)
    if actual.lower() != expected.lower():
        raise ChecksumError(
            f"sha256 mismatch for {path}: expected {expected.lower()}, got {actual}"
            f"{_html_hint(path)}; delete the file and download it again")
    return actual


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise TypeError(f"checkpoint config value {obj!r} is not JSON-serialisable")


def save_checkpoint(model: nn.Module, path: str | os.PathLike, config: dict[str, Any] | None = None
                    ) -> str:
    """Write ``model``'s weights and ``config`` to ``path`` (atomically); return the file's
    sha256. ``arch``, ``arch_kwargs`` and ``num_classes`` default to the model's own
    attributes (every zoo model has them); the same model and config always give the same
    bytes, hence the same hash."""
    from safetensors.torch import save_file

    cfg = dict(config or {})
    cfg.setdefault("arch", getattr(model, "arch", None))
    cfg.setdefault("arch_kwargs", getattr(model, "arch_kwargs", {}))
    cfg.setdefault("num_classes", getattr(model, "num_classes", None))
    if not cfg["arch"] or cfg["num_classes"] is None:
        raise CheckpointError("save_checkpoint needs config['arch'] and config['num_classes'] "
                              "(zoo models carry them as model.arch / model.num_classes)")
    cfg["format_version"] = FORMAT_VERSION
    meta = {METADATA_KEY: json.dumps(cfg, sort_keys=True, default=_json_default)}
    # clone: safetensors refuses tensors that share storage
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return sha256_file(path)


def read_checkpoint_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config stored in a checkpoint, without loading the weights."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if looks_like_html(path):
        raise CheckpointError(f"cannot load checkpoint {path}{_html_hint(path)}; delete it and "
                              "download it again")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(
            f"cannot load checkpoint {path}: not a safetensors file ({exc}); robustmatrix "
            "checkpoints are written by save_checkpoint (pinned third-party weights are loaded "
            "by name, e.g. 'akamaster-resnet20')") from exc
    if METADATA_KEY not in meta:
        raise CheckpointError(f"checkpoint {path} has no '{METADATA_KEY}' config in its metadata; "
                              "it was not written by save_checkpoint")
    return json.loads(meta[METADATA_KEY])


def load_checkpoint(path: str | os.PathLike, sha256: str | None = None, *,
                    device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved by :func:`save_checkpoint`; return ``(model.eval(), config)``.
    With ``sha256`` the file is verified before anything is read from it."""
    from safetensors.torch import load_file

    from bench.core.registry import create_model

    if sha256 is not None:
        if not Path(path).is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        verify_sha256(path, sha256)
    cfg = read_checkpoint_config(path)
    model = create_model(cfg["arch"], num_classes=cfg["num_classes"], **cfg.get("arch_kwargs", {}))
    state = load_file(str(path), device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"checkpoint {path} does not match architecture '{cfg['arch']}': "
                              f"{' '.join(s.strip() for s in first[:3])}") from exc
    return model.to(device).eval(), cfg
