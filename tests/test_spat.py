"""SPAT and PGD adversarial training (defenses/spat.py): one code path, weights, budgets."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import defenses.spat as spat_mod
from bench.core import paths
from bench.core.registry import DEFENSES, create_defense
from defenses.base import DefenseNotFittedError
from defenses.spat import (
    AT_PRESETS,
    adversarial_train,
    default_arch,
    pgd_perturb,
    shared_pixel_weights,
)

EPS = 8 / 255


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster (and much faster on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyNet(nn.Module):
    """conv -> pool -> linear, with ``features`` like the zoo models."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.linear = nn.Linear(6 * 4, num_classes)
        self.num_classes = num_classes

    def features(self, x):
        return nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1)

    def forward(self, x):
        return self.linear(self.features(x))


def toy_data(n: int = 48, classes: int = 4, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = (0.5 + 0.3 * torch.randn(n, 3, size, size, generator=g)
         + 0.1 * y.view(-1, 1, 1, 1)).clamp(0, 1)
    return x, y


def test_shared_pixel_weights_lie_in_unit_interval_and_span_it():
    torch.manual_seed(0)
    model = TinyNet().eval()
    x, _ = toy_data(8)
    W = shared_pixel_weights(model, x)
    assert W.shape == x.shape
    assert float(W.min()) >= 0.0 and float(W.max()) <= 1.0
    flat = W.flatten(1)
    assert torch.allclose(flat.max(1).values, torch.ones(len(x)))
    assert torch.allclose(flat.min(1).values, torch.zeros(len(x)))
    Wr = shared_pixel_weights(model, x, normalise="rank")
    assert float(Wr.min()) == 0.0 and float(Wr.max()) == 1.0
    assert float(Wr.mean()) == pytest.approx(0.5, abs=1e-3)
    # the rank keeps the ordering of the min-max weights (up to ties)
    assert torch.all(W.flatten(1).argmax(1) == Wr.flatten(1).argmax(1))
    Wc = shared_pixel_weights(model, x, reduce_channels=True, classes=[0, 2])
    assert Wc.shape == x.shape and float(Wc.min()) >= 0 and float(Wc.max()) <= 1
    assert torch.equal(Wc[:, 0], Wc[:, 1])  # one weight per pixel


def test_shared_pixel_weights_are_the_min_over_classes_of_normalised_saliency():
    # a linear model: grad_x z_k = A_k everywhere, so the weights are known in closed form
    torch.manual_seed(1)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3, bias=False))
    x = torch.rand(2, 3, 4, 4)
    A = lin[1].weight.detach().abs().view(3, 3, 4, 4)

    def mm(s):
        return (s - s.min()) / (s.max() - s.min())

    expected = mm(torch.minimum(torch.minimum(mm(A[0]), mm(A[1])), mm(A[2])))
    W = shared_pixel_weights(lin, x)
    assert torch.allclose(W[0], expected, atol=1e-6) and torch.allclose(W[1], expected, atol=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_perturbations_stay_in_eps_ball_and_image_box(weighted):
    torch.manual_seed(0)
    model = TinyNet().eval()
    x, y = toy_data(16)
    x[:4] = 0.0  # saturated images: the [0, 1] clip must bind
    x[4:8] = 1.0
    W = shared_pixel_weights(model, x) if weighted else None
    delta = pgd_perturb(model, x, y, eps=EPS, steps=5, step_size=EPS / 2, weight=W,
                        generator=torch.Generator().manual_seed(0))
    assert float(delta.abs().max()) <= EPS + 1e-6
    assert float((x + delta).min()) >= 0.0 and float((x + delta).max()) <= 1.0
    assert float(delta.abs().max()) > 0.5 * EPS  # it moved


def test_zero_weight_freezes_the_attack():
    model = TinyNet().eval()
    x, y = toy_data(8)
    delta = pgd_perturb(model, x, y, eps=EPS, steps=3, step_size=EPS, random_start=False,
                        weight=torch.zeros_like(x))
    assert torch.count_nonzero(delta) == 0


def test_spat_and_pgd_share_one_code_path(monkeypatch):
    """With the shared-pixel weights forced to ones, SPAT training IS PGD training, bit for bit:
    the methods differ only in the weighting."""
    x, y = toy_data(48)
    kw = dict(eps=EPS, steps=2, step_size=EPS / 2, epochs=2, batch_size=16, lr=0.05,
              crop_padding=1, seed=3, progress=False)

    def fresh():
        torch.manual_seed(0)
        return TinyNet()

    pgd_model = fresh()
    adversarial_train(pgd_model, (x, y), method="pgd", **kw)
    monkeypatch.setattr(spat_mod, "shared_pixel_weights",
                        lambda model, x, **k: torch.ones_like(x))
    spat_model = fresh()
    adversarial_train(spat_model, (x, y), method="spat", **kw)
    for (k, a), (_, b) in zip(pgd_model.state_dict().items(), spat_model.state_dict().items()):
        assert torch.equal(a, b), k
    # and with the real weights the trained models differ
    monkeypatch.undo()
    real_spat = fresh()
    adversarial_train(real_spat, (x, y), method="spat", **kw)
    assert not torch.equal(real_spat.linear.weight, pgd_model.linear.weight)


def test_spat_passes_its_weights_to_the_same_attack(monkeypatch):
    seen = []
    real = spat_mod.pgd_perturb

    def spy(*args, weight=None, **kw):
        seen.append(weight)
        if weight is not None:
            assert float(weight.min()) >= 0 and float(weight.max()) <= 1
        return real(*args, weight=weight, **kw)

    monkeypatch.setattr(spat_mod, "pgd_perturb", spy)
    x, y = toy_data(32)
    for method in ("pgd", "spat"):
        seen.clear()
        adversarial_train(TinyNet(), (x, y), method=method, eps=EPS, steps=1, step_size=EPS,
                          epochs=1, batch_size=16, progress=False, spat_classes=2)
        assert len(seen) == 2
        assert all((w is None) == (method == "pgd") for w in seen)


def test_extra_loss_hook_sees_penultimate_features_and_aux():
    calls = []

    def hook(features, y, aux):
        calls.append((features.shape, aux.clone()))
        return features.pow(2).mean()

    x, y = toy_data(32)
    aux = torch.arange(32)
    hist = adversarial_train(TinyNet(), (x, y), method="pgd", eps=EPS, steps=1, step_size=EPS,
                             epochs=1, batch_size=16, progress=False, extra_loss=hook, aux=aux)
    assert [c[0] for c in calls] == [torch.Size([16, 24])] * 2
    assert sorted(torch.cat([c[1] for c in calls]).tolist()) == list(range(32))
    assert "extra_loss" in hist[0]


def test_bad_arguments_are_clear_errors():
    x, y = toy_data(8)
    with pytest.raises(ValueError, match="method"):
        adversarial_train(TinyNet(), (x, y), method="trades", eps=EPS, steps=1, step_size=EPS,
                          epochs=1)
    with pytest.raises(ValueError, match="preset"):
        create_defense("test_spat").fit((x, y), preset="huge")


def test_presets_and_default_architectures():
    assert default_arch("cifar10") == "resnet20"
    assert default_arch("cifar10", "full") == "preact_resnet18"
    assert default_arch("imagenet10") == "resnet18_imagenet"
    assert default_arch("test_tiny") == "test_tiny_cnn"
    assert AT_PRESETS["quick"]["steps"] in (1, 2) and AT_PRESETS["quick"]["random_start"]
    assert AT_PRESETS["full"]["steps"] == 10
    assert spat_mod.resolve_init("auto", "cifar10", "resnet20", "quick") == "akamaster-resnet20"
    assert spat_mod.resolve_init("auto", "cifar10", "resnet20", "full") is None
    assert spat_mod.resolve_init("auto", "test_tiny", "test_tiny_cnn", "quick") is None
    assert (spat_mod.resolve_init("resnet20@quick", "cifar10", "resnet20", "full")
            == "resnet20@quick")
    d = create_defense("test_pgd_at")
    assert d.init is None and d.config()["init"] is None
    s = d.training_settings("full")
    assert s["steps"] == 10 and s["step_size"] == pytest.approx(EPS / 4)
    assert s["epochs"] == 1  # the explicit knob wins over the preset


@pytest.mark.parametrize("name", ["spat", "pgd_at", "test_spat", "test_pgd_at"])
def test_registered(name):
    assert name in DEFENSES.list()


@pytest.mark.parametrize("name", ["test_spat", "test_pgd_at"])
def test_fit_save_load_and_not_fitted(name):
    from bench.data import load_eval, load_train

    train = load_train("test_tiny")
    test = load_eval("test_tiny", 40)
    d = create_defense(name)
    assert d.structure.trainable and not d.structure.has_preprocessor
    with pytest.raises(DefenseNotFittedError):
        d(test.images)
    cfg_before = json.dumps(d.config(), sort_keys=True, default=str)
    d.fit(train, preset="tiny", progress=False)
    d.eval()
    assert json.dumps(d.config(), sort_keys=True, default=str) == cfg_before  # stable artifact key
    assert d.history and d.history[-1]["epoch"] == 1
    with torch.no_grad():
        out = d(test.images)
    assert out.shape == (40, 10) and torch.isfinite(out).all()

    state = {k: v.clone() for k, v in d.state_dict().items()}
    fresh = create_defense(name).eval()
    fresh.load_state_dict(state)
    assert fresh.fitted
    with torch.no_grad():
        assert torch.equal(fresh(test.images), out)


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.skipif(paths.shared_data() is None, reason="needs ../shared/data (Imagenette tree)")
@pytest.mark.parametrize("name", ["spat", "pgd_at"])
def test_imagenet10_small_resolution(name):
    from bench.data import load_eval, load_train

    if not (paths.shared_data() / "imagenette-224").is_dir():
        pytest.skip("no Imagenette tree in the shared data folder")
    train = load_train("imagenet10", resolution=32, limit=200)
    test = load_eval("imagenet10", 50, resolution=32)
    d = create_defense(name, dataset="imagenet10", resolution=32, arch="test_tiny_cnn",
                       epochs=1, batch_size=50)
    assert d.eps == pytest.approx(4 / 255)  # the dataset's default budget
    d.fit(train, preset="quick", progress=False)
    d.eval()
    with torch.no_grad():
        out = d(test.images)
    assert out.shape == (50, 10) and torch.isfinite(out).all()
    acc = float((out.argmax(1) == test.labels).float().mean())
    assert 0.0 <= acc <= 1.0
