"""Attack contract properties, for every registered test_* attack, and the equivalence of the
harness's cells with direct torchattacks / pyautoattack calls."""

import pytest
import torch

from attacks.base import check_epsilon, perturbation_norm
from bench.core.registry import ATTACKS, create_attack
from bench.harness.scoring import score


@pytest.fixture(scope="module")
def tiny():
    from bench.data import load_eval
    from defenses.toys import test_undefended

    data = load_eval("test_tiny", 20, seed=0)
    return test_undefended().eval(), data.images, data.labels


@pytest.mark.parametrize("name", ATTACKS.list("test_*"))
@pytest.mark.parametrize("threat,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_attack_properties(tiny, name, threat, eps):
    model, x, y = tiny
    cls = ATTACKS.get(name)
    attack = create_attack(name, threat=threat) if threat in getattr(
        cls, "threats", ("linf", "l2")) else None
    if attack is None:
        pytest.skip(f"{name} does not support {threat}")
    res = attack(model, x, y, eps)
    assert res.adv.shape == x.shape and torch.isfinite(res.adv).all()
    assert res.adv.min() >= 0 and res.adv.max() <= 1
    assert (perturbation_norm(res.adv, x, threat) <= eps + 1e-6).all()
    clean = score(model, x, y).correct
    adv = score(model, res.adv, y).correct
    assert adv.float().mean() <= clean.float().mean()
    assert res.forward_passes > 0 and res.backward_passes > 0
    # seeded: the same call twice gives the same adversarials
    assert torch.equal(attack(model, x, y, eps).adv, res.adv)


def test_attack_does_not_disturb_global_rng(tiny):
    model, x, y = tiny
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    create_attack("test_pgd")(model, x, y, 8 / 255)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "abc", 8])
def test_bad_epsilon_is_refused(bad):
    with pytest.raises(ValueError, match="epsilon"):
        check_epsilon(bad, "linf")


def test_unknown_threat_is_refused():
    with pytest.raises(ValueError, match="supports threat models"):
        create_attack("cw", threat="linf")


def test_pgd_cell_equals_direct_torchattacks(tiny):
    import torchattacks

    from bench.harness.scoring import attack_batch

    model, x, y = tiny
    eps, steps, seed = 8 / 255, 5, 7
    attack = create_attack("pgd", threat="linf", steps=steps, seed=0)
    clean = score(model, x, y)
    rows, adv, _ = attack_batch(model, attack, x, y, eps, clean=clean, seed=seed, draws=1)
    torch.manual_seed(seed)
    direct = torchattacks.PGD(model, eps=eps, alpha=2.5 / steps * eps, steps=steps)(x, y)
    assert torch.equal(adv, direct)
    with torch.no_grad():
        direct_correct = (model(direct).argmax(1) == y).int().tolist()
    assert [r["adv_correct"] for r in rows] == direct_correct


def test_autoattack_cell_equals_direct_pyautoattack(tiny):
    from pyautoattack import AutoAttack

    from bench.harness.scoring import attack_batch

    model, x, y = tiny
    eps, seed = 8 / 255, 3
    attack = create_attack("autoattack", threat="linf", version="custom",
                           attacks=["apgd-ce", "apgd-t"], n_iter=5, n_target_classes=2)
    clean = score(model, x, y)
    rows, adv, rec = attack_batch(model, attack, x, y, eps, clean=clean, seed=seed, draws=1)
    aa = AutoAttack(model, norm="Linf", eps=eps, seed=seed, version="custom",
                    attacks=["apgd-ce", "apgd-t"], device="cpu")
    aa.apgd.n_iter = aa.apgd_targeted.n_iter = 5
    aa.apgd_targeted.n_target_classes = 2
    direct, _ = aa.run_standard_evaluation(x, y, batch_size=len(x))
    assert torch.equal(adv, direct.clamp(0, 1))
    with torch.no_grad():
        direct_correct = (model(direct).argmax(1) == y).int().tolist()
    assert [r["adv_correct"] for r in rows] == direct_correct
    assert any("apgd" in line.lower() for line in rec["log"])  # its log was captured
