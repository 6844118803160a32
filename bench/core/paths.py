"""Where things live on disk. Every path comes from here or from the config, never from CWD.

* data roots: ``$ROBUSTMATRIX_DATA``, then ``<repo>/../shared/data`` (the development copy),
  then ``~/.cache/robustmatrix/data`` (where torchvision downloads go).
* weights roots: ``$ROBUSTMATRIX_WEIGHTS``, then ``<repo>/../shared/weights``, then
  ``~/.cache/robustmatrix/weights`` (where pinned downloads go).
* cache dir (decoded tensors, trained artifacts): ``$ROBUSTMATRIX_CACHE`` or
  ``~/.cache/robustmatrix``.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = REPO_ROOT.parent / "shared"


def cache_dir() -> Path:
    p = Path(os.environ.get("ROBUSTMATRIX_CACHE", Path.home() / ".cache" / "robustmatrix"))
    return p.expanduser()


def data_roots() -> list[Path]:
    roots = []
    if os.environ.get("ROBUSTMATRIX_DATA"):
        roots.append(Path(os.environ["ROBUSTMATRIX_DATA"]).expanduser())
    roots += [SHARED / "data", cache_dir() / "data"]
    return roots


def weights_roots() -> list[Path]:
    roots = []
    if os.environ.get("ROBUSTMATRIX_WEIGHTS"):
        roots.append(Path(os.environ["ROBUSTMATRIX_WEIGHTS"]).expanduser())
    roots += [SHARED / "weights", cache_dir() / "weights"]
    return roots


def shared_data() -> Path | None:
    """The development data folder if present (tests skip when it is None)."""
    for root in data_roots():
        if (root / "cifar10-jpeg").is_dir() or (root / "imagenette-224").is_dir():
            return root
    return None
