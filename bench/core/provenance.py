"""Provenance recorded with every cell: code version, package versions, machine, date."""

from __future__ import annotations

import functools
import platform
import subprocess
import time
from importlib import metadata

from bench.core import paths

PACKAGES = ("robustmatrix", "torch", "torchvision", "torchattacks", "pyautoattack", "numpy")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``git describe`` of the checkout (with -dirty), else the installed package version."""
    try:
        out = subprocess.run(["git", "-C", str(paths.REPO_ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return metadata.version("robustmatrix")
    except metadata.PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def base_provenance(device: str) -> dict:
    import torch

    dev = device
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return {"code_version": code_version(), "packages": package_versions(),
            "python": platform.python_version(), "host": platform.node(),
            "platform": platform.platform(), "device": dev,
            "torch_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
