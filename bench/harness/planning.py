"""Planning: which cells a config asks for.

* :func:`expand` turns a :class:`BenchmarkConfig` into :class:`CellPlan` objects;
* :func:`attack_threats` / :func:`create_attack` read and build an attack from its spec.
"""

from __future__ import annotations

from dataclasses import dataclass

from attacks.base import Attack
from bench.core.config import BenchmarkConfig, ComponentSpec, DatasetSpec
from bench.core.registry import ATTACKS, RegistryError
from bench.core.schema import CLEAN


@dataclass
class CellPlan:
    dataset: DatasetSpec
    defense: ComponentSpec
    attack: ComponentSpec | None  # None for the clean cell
    threat: str
    eps: float

    @property
    def attack_label(self) -> str:
        return self.attack.label if self.attack else CLEAN


def attack_threats(spec: ComponentSpec) -> tuple[str, ...]:
    cls = ATTACKS.get(spec.name)
    threats = getattr(cls, "threats", None)
    if threats is None:  # a factory function: build once and ask its class
        threats = type(create_attack(spec, None)).threats
    only = spec.options.get("threat")
    return tuple(t for t in threats if only is None or t == only)


def create_attack(spec: ComponentSpec, threat: str | None, seed: int = 0) -> Attack:
    from bench.core.config import ConfigError

    opts = dict(spec.options)
    opts.pop("threat", None)
    try:
        return ATTACKS.create(spec.name, threat=threat, seed=seed, **opts)
    except ValueError as exc:  # an attack refusing its options (RegistryError is one too)
        if isinstance(exc, (ConfigError, RegistryError)):
            raise
        raise ConfigError(f"attack '{spec.label}': {exc}; fix its options in the config") from None


def expand(cfg: BenchmarkConfig) -> list[CellPlan]:
    """Every (dataset, defense, attack, threat, eps) cell, clean cells first per defense."""
    from bench.data import dataset_info

    plans: list[CellPlan] = []
    for ds in cfg.datasets:
        info = dataset_info(ds.name)
        for de in cfg.defenses:
            plans.append(CellPlan(ds, de, None, "none", 0.0))
            for threat, eps_list in cfg.threat_models.items():
                eps_values = eps_list or [info.default_eps.get(threat, 0.0)]
                for eps in eps_values:
                    for at in cfg.attacks:
                        if threat in attack_threats(at):
                            plans.append(CellPlan(ds, de, at, threat, float(eps)))
    return plans
