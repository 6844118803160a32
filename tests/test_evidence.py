"""The per-row evidence checks (bench/harness/evidence.py) on small models: each one passes on
a clean case and fails on a case built to trigger it."""

import torch
from torch import nn

from attacks.base import perturbation_norm
from bench.core.registry import create_attack
from bench.harness import evidence
from defenses.base import Defense, Preprocessor


class CNN(nn.Module):
    def __init__(self, k=10):
        super().__init__()
        torch.manual_seed(0)
        self.f = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                               nn.Flatten())
        self.fc = nn.Linear(128, k)

    def forward(self, x):
        return self.fc(self.f(x))


class Round(Preprocessor):
    differentiable = False

    def forward(self, x):
        return torch.round(x * 3) / 3


class Noisy(nn.Module):  # unstable: random logits on top
    def __init__(self, m):
        super().__init__()
        self.classifier = m

    def forward(self, x):
        out = self.classifier(x)
        return out + 5 * torch.randn_like(out)


def _data(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_binarization_pgd_passes_plain_cnn():
    x, y = _data()
    d = Defense(CNN()).eval()
    r = evidence.binarization_test(d, create_attack("pgd", threat="linf", steps=10), "linf",
                                   8 / 255, x, y, n=6)
    assert r["status"] == "pass", r
    assert r["valid"] >= 4 and r["pass_rate"] >= 0.9


def test_binarization_weak_attack_fails():
    x, y = _data()
    d = Defense(CNN()).eval()
    weak = create_attack("pgd", threat="linf", steps=1, rel_stepsize=0.01, random_start=False)
    r = evidence.binarization_test(d, weak, "linf", 8 / 255, x, y, n=6)
    assert r["status"] == "fail", r
    assert r["pass_rate"] < 0.5


def test_binarization_l2_and_masked_gradients():
    x, y = _data()
    d = Defense(CNN()).eval()
    r = evidence.binarization_test(d, create_attack("pgd", threat="l2", steps=10), "l2", 1.0,
                                   x, y, n=6)
    assert r["status"] == "pass", r
    masked = Defense(CNN(), Round()).eval()
    # PGD as the suites run it (random start): the rounding's zero gradient leaves it at its
    # random start, which the calibrated task classifies as 0 (a random point never solves it)
    r = evidence.binarization_test(masked, create_attack("pgd", threat="linf", steps=10),
                                   "linf", 0.2, x, y, n=6)
    assert r["status"] == "fail" and r["pass_rate"] == 0 and r["scored"] >= 4, r
    r = evidence.binarization_test(masked, create_attack("bpda", threat="linf", inner="pgd",
                                                         inner_options={"steps": 10}),
                                   "linf", 0.2, x, y, n=6)
    assert r["status"] == "pass" and r["scored"] >= 4, r


def test_binarization_task_is_calibrated():
    """The known adversarial lies inside the ball, the clean point and random points of the
    ball are class 0, and the binary model keeps the defense in eval mode after an attack."""
    x, _ = _data(1)
    d = Defense(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10))).eval()
    gen = torch.Generator().manual_seed(0)
    for threat, eps in (("linf", 8 / 255), ("l2", 0.5)):
        b = evidence._boundary_point(x[0], eps, threat, gen)
        dist = float(perturbation_norm(b, x[:1], threat)[0])
        assert abs(dist - eps) < 1e-3 * eps and 0 <= b.min() and b.max() <= 1, (threat, dist)
    inner = torch.cat([x[:1], evidence._ball_sample(x[0], 8 / 255, "linf", 0.95, 255, gen)])
    f_neg = evidence._features(d, inner)
    f_pos = evidence._features(d, evidence._boundary_point(x[0], 8 / 255, "linf", gen))
    head = evidence._fit_head(f_neg, f_pos, closeness=0.999, logit_range=10.0)
    score = lambda f: (f @ head.weight[1] + head.bias[1]).detach()  # noqa: E731
    assert float(score(f_pos)) > 0 > float(score(f_neg).max())
    # closeness 0.999: the boundary point is just inside class 1, far less than the inner margin
    assert float(score(f_pos)) < 1e-2 * abs(float(score(f_neg[:1])))
    spread = float(torch.cat([score(f_neg), score(f_pos)]).max() -
                   torch.cat([score(f_neg), score(f_pos)]).min())
    assert abs(spread - 10.0) < 1e-3  # rescaled to the defense's logit range
    bin_def = evidence.BinarizedDefense(d, head)
    assert not bin_def.training
    create_attack("pgd", threat="linf", steps=2)(bin_def, x[:1], torch.zeros(1).long(), 8 / 255)
    assert not any(m.training for m in bin_def.modules())


def test_binarization_not_applicable_without_feature_layer():
    conv_only = nn.Sequential(nn.Conv2d(3, 10, 8), nn.Flatten())
    x, y = _data()
    r = evidence.binarization_test(Defense(conv_only).eval(), create_attack("pgd", threat="linf"),
                                   "linf", 8 / 255, x, y, n=2)
    assert r["status"] == "n/a" and "linear" in r["seen"]


def test_unstable_predictions_fires_on_noisy_model_only():
    x, y = _data()
    clean = Defense(CNN()).eval()
    assert evidence.unstable_predictions(clean, x, y, "linf", 8 / 255)["status"] == "pass"
    noisy = Noisy(CNN()).eval()
    assert evidence.unstable_predictions(noisy, x, y, "linf", 8 / 255)["status"] == "fail"


def test_single_step_check():
    x, y = _data()
    d = Defense(CNN()).eval()
    none_robust = torch.zeros(len(y), dtype=torch.bool)
    all_robust = torch.ones(len(y), dtype=torch.bool)
    assert evidence.single_step_check(d, "linf", 0.3, x, y, none_robust)["status"] == "pass"
    # FGSM at a large eps breaks points: claimed robust by the cell -> the iterative attack lost
    r = evidence.single_step_check(d, "linf", 0.3, x, y, all_robust)
    assert r["status"] == "fail" and r["only"] > 0
