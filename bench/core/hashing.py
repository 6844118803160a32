"""Content hashes: the ONE place the project computes a sha256 (files, bytes, JSON, state dicts).

Every hash is a lowercase hex sha256. Two of them are identities that results carry:

* :func:`file_sha256` of a weights file, an artifact, a stored adversarial tensor or a
  submission file;
* :func:`state_dict_sha256` of a module that exists only in memory (a defense's
  ``fingerprint()``, the classifier inside a semantic autoencoder, the before/after check of
  ``validate``): names, dtypes, shapes and raw bytes of every tensor, in name order; non-tensor
  entries (``extra_state``) are skipped.

:func:`json_sha256` hashes a JSON-able object (sorted keys; ``default=str`` unless given), the
form of every cache and cell key.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Mapping

import torch
from torch import nn

_CHUNK = 1 << 20


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def text_sha256(text: str) -> str:
    return bytes_sha256(text.encode())


def file_sha256(path: str | os.PathLike, chunk_size: int = _CHUNK) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


def json_sha256(obj: Any, *, default: Callable[[Any], Any] | None = str) -> str:
    """sha256 of ``json.dumps(obj, sort_keys=True)``; ``default=None`` refuses non-JSON values."""
    return text_sha256(json.dumps(obj, sort_keys=True, default=default))


def state_dict_sha256(model_or_state: nn.Module | Mapping[str, Any]) -> str:
    """A content hash of a state dict (names, dtypes, shapes and bytes, in name order)."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():  # the bytes through the buffer protocol (no copy of a large tensor)
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()
