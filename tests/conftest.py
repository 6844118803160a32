"""Shared fixtures. Tests are fast by construction: tiny models, a few images, CPU.

The trained-artifact cache is a per-session temporary folder unless ROBUSTMATRIX_CACHE is set,
so a test never reads a developer's cache.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

_SESSION_CACHE = tempfile.mkdtemp(prefix="robustmatrix-test-cache-")
os.environ.setdefault("ROBUSTMATRIX_CACHE", _SESSION_CACHE)
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data():
    from bench.core.paths import shared_data

    root = shared_data()
    if root is None:
        pytest.skip("../shared/data is absent (a fresh clone): data tests skipped")
    return root
