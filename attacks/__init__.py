"""Attacks. Each module registers its entries in ``bench.core.registry.ATTACKS``.

Where to look: ``base.py`` (the contract), ``standard.py`` (PGD, CW, AutoAttack wrappers of
torchattacks / pyautoattack), ``adaptive.py`` (BPDA, EOT, detector-aware),
``wrong_label_latent.py`` (the semantic-AE attack).
"""

from attacks.base import DEFAULT_SEED, Attack, AttackResult

_BUILTIN = ["standard", "adaptive", "wrong_label_latent"]


def _import_builtins() -> None:
    import importlib
    import importlib.util

    for name in _BUILTIN:
        if importlib.util.find_spec(f"attacks.{name}") is not None:
            importlib.import_module(f"attacks.{name}")


_import_builtins()

__all__ = ["Attack", "AttackResult", "DEFAULT_SEED"]
