"""Defenses. Each module registers its entries in ``bench.core.registry.DEFENSES``.

Where to look: ``base.py`` (the contract), ``undefended.py`` (the baseline),
``semantic_autoencoder.py``, ``aae_detector.py``, ``spat.py`` (SPAT and PGD-AT),
``srd_purifier.py``, ``input_transforms.py`` (JPEG, bit depth, median: the
purification baselines), ``toys.py`` (tiny ``test_*`` defenses used by the test-suite).
"""

from defenses.base import Defense, DefenseNotFittedError, DefenseStructure, Detector, Preprocessor

_BUILTIN = ["undefended", "toys", "semantic_autoencoder", "aae_detector", "spat", "srd_purifier",
            "input_transforms"]


def _import_builtins() -> None:
    import importlib
    import importlib.util

    for name in _BUILTIN:
        if importlib.util.find_spec(f"defenses.{name}") is not None:
            importlib.import_module(f"defenses.{name}")


_import_builtins()

__all__ = ["Defense", "DefenseNotFittedError", "DefenseStructure", "Detector", "Preprocessor"]
