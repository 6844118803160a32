"""Tiny ``test_*`` defenses that live in the real registry so the test-suite iterates over them.

They run on the synthetic ``test_tiny`` dataset (or any dataset) in well under a second.
"""

from __future__ import annotations

from bench.registry import DEFENSES
from defenses.undefended import Undefended


@DEFENSES.register("test_undefended")
def test_undefended(*, dataset: str = "test_tiny", classifier: str = "test_tiny_cnn@tiny",
                    device: str = "cpu", progress: bool = False) -> Undefended:
    """An honest, undefended tiny CNN (the 'no flag expected' reference)."""
    return Undefended(dataset=dataset, classifier=classifier, device=device, progress=progress)
