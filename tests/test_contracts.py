"""The defense and attack contracts, for EVERY ``test_*`` entry of the registries (timm style: a
new tiny entry is tested here for free), and the attack base class's final ``__call__``."""

from __future__ import annotations

import json

import pytest
import torch

from attacks.base import Attack, AttackResult, RunContext
from bench.artifacts import prepare_defense
from bench.core.registry import ATTACKS, DEFENSES, create_attack
from bench.harness.scoring import Scored, attack_batch, score


@pytest.fixture(scope="module")
def tiny():
    from bench.data import load_eval

    data = load_eval("test_tiny", 20, seed=0)
    return data.images, data.labels


@pytest.fixture(scope="module")
def built():
    """Each test_* defense, built (and fitted with the tiny preset, cached) once."""
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str):
        if name not in cache:
            cache[name], _ = prepare_defense(name, {}, dataset="test_tiny", device="cpu",
                                             preset="tiny", progress=False, log=lambda m: None)
        return cache[name]

    return get


@pytest.mark.parametrize("name", DEFENSES.list("test_*"))
def test_defense_contract(built, tiny, name):
    x, y = tiny
    defense = built(name).eval()
    before = defense.fingerprint()
    with torch.no_grad():
        out = defense(x)
    assert out.shape == (len(x), int(y.max()) + 1)
    assert out.is_floating_point() and torch.isfinite(out).all()
    assert defense.fingerprint() == before, "forward changed the defense's state"
    assert not any(m.training for m in defense.modules()), "eval() must reach every module"
    s = defense.structure.as_dict()
    assert set(s) >= {"has_preprocessor", "has_detector", "random", "trainable"}
    if s["has_detector"]:
        assert defense.detect(x).shape == (len(x),)
    json.dumps(defense.config(), default=str)  # part of the artifact key: JSON-able
    clean = score(defense, x, y, draws=2)
    assert clean.correct.shape == (len(x),) and clean.flagged.dtype == torch.bool


@pytest.mark.parametrize("defense_name", DEFENSES.list("test_*"))
@pytest.mark.parametrize("attack_name", ATTACKS.list("test_*"))
def test_every_test_attack_runs_on_every_test_defense(built, tiny, defense_name, attack_name):
    x, y = tiny
    defense = built(defense_name).eval()
    attack = create_attack(attack_name, threat="linf")
    clean = score(defense, x, y)
    rows, adv, _ = attack_batch(defense, attack, x, y, 8 / 255, clean=clean, seed=0, draws=1)
    assert adv.shape == x.shape and (adv - x).abs().max() <= 8 / 255 + 1e-6
    ok = clean.correct & ~clean.flagged
    assert sum(r["robust"] for r in rows) <= int(ok.sum())


def test_attack_call_is_final():
    with pytest.raises(TypeError, match="final"):
        class Bad(Attack):  # noqa: F841
            def __call__(self, *a, **kw):
                return None


def test_seed_and_context_are_call_arguments(tiny):
    x, y = tiny
    seen = []

    class Probe(Attack):
        random = False

        def run(self, model, images, labels, eps, *, seed, context):
            seen.append((seed, context))
            return AttackResult(adv=images.clone())

    ctx = RunContext(dataset="test_tiny", fit_preset="tiny")
    model = DEFENSES.create("test_undefended").eval()
    probe = Probe(seed=3)
    probe(model, x, y, 0.0)
    probe(model, x, y, 0.0, seed=7, context=ctx)
    assert seen == [(3, RunContext()), (7, ctx)]
    assert not hasattr(probe, "context") and not hasattr(probe, "current_seed")
    # a Scored built by hand is accepted as the clean scores
    ones = torch.ones(len(y), dtype=torch.bool)
    rows, _, _ = attack_batch(model, probe, x, y, 0.0, clean=Scored(y, ones, ~ones), seed=1,
                              draws=1, context=ctx)
    assert seen[-1] == (1, ctx) and len(rows) == len(y)
