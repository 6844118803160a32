"""Semantic / plain autoencoder preprocessor and the shared latent metrics (tiny, CPU)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from torch import nn

from bench.core.metrics import psnr, separation_scores, ssim
from bench.core.registry import DEFENSES
from bench.harness.reports import semantic_ae_report, tsne_figure
from defenses.base import DefenseNotFittedError

TINY = {"epochs": 3}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two torch threads on a shared 2-core machine cost several times the CPU of one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def quick_classifier(train, seed: int = 0, steps: int = 150) -> nn.Module:
    """A linear classifier trained full-batch in about a second (stands in for the zoo CNN)."""
    torch.manual_seed(seed)
    c, h, w = train.images.shape[1:]
    model = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(train.images), train.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.num_classes = 10
    return model.eval()


@pytest.fixture(scope="module")
def data():
    from bench.data import load_eval, load_train

    return load_train("test_tiny", limit=500), load_eval("test_tiny", 200)


@pytest.fixture(scope="module")
def classifier(data):
    return quick_classifier(data[0])


@pytest.fixture(scope="module")
def fitted(data, classifier):
    train, _ = data
    sem = DEFENSES.create("test_semantic_ae", classifier=classifier, **TINY)
    plain = DEFENSES.create("test_plain_ae", classifier=classifier, **TINY)
    sem.fit(train, progress=False)
    plain.fit(train, progress=False)
    return sem.eval(), plain.eval()


def roundtrip(defense, name: str, classifier):
    buffer = io.BytesIO()
    torch.save(defense.state_dict(), buffer)
    buffer.seek(0)
    fresh = DEFENSES.create(name, classifier=classifier, seed=123, **TINY)  # other init
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    fresh.fitted = True
    return fresh.eval()


def test_use_before_fit_raises(classifier, data):
    d = DEFENSES.create("test_semantic_ae", classifier=classifier, **TINY)
    x = data[1].images[:4]
    assert d.trainable and not d.fitted
    with pytest.raises(DefenseNotFittedError, match="test_semantic_ae"):
        d(x)
    with pytest.raises(DefenseNotFittedError):
        d.encode(x, data[1].labels[:4])


def test_training_lowers_reconstruction_error(fitted):
    for d in fitted:
        assert len(d.history) == TINY["epochs"]
        assert d.history[-1] < d.history[0]
        assert d.train_seconds is not None and d.train_seconds > 0


def test_state_dict_roundtrip_gives_identical_outputs(fitted, classifier, data):
    x, y = data[1].images[:32], data[1].labels[:32]
    for d, name in zip(fitted, ("test_semantic_ae", "test_plain_ae")):
        fresh = roundtrip(d, name, classifier)
        with torch.no_grad():
            assert torch.equal(fresh(x), d(x))
            assert torch.equal(fresh.preprocessor(x), d.preprocessor(x))
            assert torch.equal(fresh.encode(x, y), d.encode(x, y))
        assert fresh.fingerprint() == d.fingerprint()


def test_semantic_latent_depends_on_label_plain_does_not(fitted, data):
    sem, plain = fitted
    x, y = data[1].images[:32], data[1].labels[:32]
    wrong = (y + 1) % 10
    with torch.no_grad():
        assert sem.label_conditioned and not plain.label_conditioned
        shift = (sem.encode(x, y) - sem.encode(x, wrong)).flatten(1).norm(dim=1)
        assert (shift > 1e-3).all()
        assert torch.equal(plain.encode(x, y), plain.encode(x, wrong))
        assert torch.equal(plain.encode(x, y), plain.encode(x))
        # the decoder has no label input: same z, same image
        z = sem.encode(x, y)
        assert torch.equal(sem.decode(z), sem.reconstruct(x, y))
    with pytest.raises(ValueError, match="needs a label"):
        sem.encode(x)


def test_declared_structure_and_surrogate(fitted, data):
    sem, plain = fitted
    s, p = sem.structure, plain.structure
    assert s.has_preprocessor and not s.preprocessor_differentiable and s.has_surrogate
    assert s.trainable and not s.random and not s.has_detector
    assert p.preprocessor_differentiable and not p.has_surrogate
    x = data[1].images[:8].clone().requires_grad_(True)
    out = sem.preprocessor.surrogate()(x)
    assert out.shape == x.shape and 0 <= float(out.min().detach()) <= float(out.max().detach()) <= 1
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the "hard" surrogate is the real forward with the label held fixed
    sem.preprocessor.surrogate_label = "hard"
    try:
        with torch.no_grad():
            assert torch.allclose(sem.preprocessor.surrogate()(x), sem.preprocessor(x))
    finally:
        sem.preprocessor.surrogate_label = "soft"
    with pytest.raises(ValueError, match="surrogate_label"):
        DEFENSES.create("test_semantic_ae", classifier=sem.classifier, surrogate_label="bogus")


def test_config_is_json_and_names_every_knob(fitted):
    cfg = fitted[0].config()
    json.dumps(cfg)
    for knob in ("latent_dim", "widths", "hidden_dim", "label_embed_dim", "label_encoding",
                 "label_join", "epochs", "lr", "batch_size", "seed", "classifier_sha256",
                 "label_conditioned", "image_shape"):
        assert knob in cfg
    assert cfg["label_conditioned"] and not fitted[1].config()["label_conditioned"]


def test_fit_rejects_wrong_geometry(classifier):
    from bench.data import LabeledImages

    d = DEFENSES.create("test_semantic_ae", classifier=classifier, **TINY)
    bad = LabeledImages(torch.rand(20, 3, 32, 32), torch.arange(20) % 10,
                        [f"x/{i}" for i in range(20)], [str(i) for i in range(10)], "test_tiny",
                        "synthetic")
    with pytest.raises(ValueError, match="resolution"):
        d.fit(bad, progress=False)


def test_semantic_latent_carries_the_label_better_than_the_plain_twin(fitted, data):
    """The measurable claim (METHODS.md section 1), with the default design (spatial latent,
    label joined to the features, class term + wrong-label term): after a short fit a linear
    probe and the silhouette on the semantic latents (true label given) beat the plain twin's,
    and the decoded images of the two AEs are close to each other. Fails if the encoder
    ignores the label, as it did with a reconstruction loss alone."""
    report = semantic_ae_report(fitted[0], data[1], plain=fitted[1])
    sem, plain = report["semantic"], report["plain"]
    assert sem["linear_probe_accuracy"] >= plain["linear_probe_accuracy"] + 0.2
    assert sem["silhouette"] > plain["silhouette"] + 0.2
    assert report["decoded_semantic_vs_plain"]["psnr"] > 20


def test_without_the_label_terms_the_latent_does_not_carry_the_label(data, classifier):
    """The control: the same semantic AE trained on reconstruction alone (class_weight = 0,
    wrong_label_weight = 0) separates the classes no better than chance-level clustering; the
    label terms are what the test above measures."""
    train, test = data
    bare = DEFENSES.create("test_semantic_ae", classifier=classifier, class_weight=0.0,
                           wrong_label_weight=0.0, **TINY).fit(train, progress=False).eval()
    assert semantic_ae_report(bare, test)["semantic"]["silhouette"] < 0.2


def test_wrong_label_moves_the_latent_but_not_the_image(fitted, data):
    """The wrong-label term: E(x, y') is classified as y' by the latent head, while D(E(x, y'))
    stays close to D(E(x, y))."""
    sem = fitted[0]
    x, y = data[1].images[:64], data[1].labels[:64]
    wrong = (y + 3) % 10
    with torch.no_grad():
        zw = sem.encode(x, wrong)
        assert (sem.ae.classify_latent(zw).argmax(1) == wrong).float().mean() > 0.8
        assert float(psnr(sem.decode(zw), sem.reconstruct(x, y)).mean()) > 20


def test_resumed_fit_ends_with_the_same_weights(data, classifier, tmp_path, monkeypatch):
    """A fit killed right after its first epoch's checkpoint resumes from it and ends with the
    weights of an uninterrupted fit (the pattern of the adversarial-training fits); a
    checkpoint of another configuration is refused in one line."""
    import bench.models.training as training

    train = data[0].subset(range(0, 500, 5))
    opts = {"classifier": classifier, "epochs": 2, "classifier_finetune_epochs": 0}
    full = DEFENSES.create("test_semantic_ae", **opts).fit(train, progress=False)
    ckpt = tmp_path / "sae.resume.pt"
    real = training.save_training_state

    class Killed(Exception):
        pass

    def save_then_die(path, state):
        real(path, state)
        raise Killed

    monkeypatch.setattr(training, "save_training_state", save_then_die)
    with pytest.raises(Killed):
        DEFENSES.create("test_semantic_ae", **opts).fit(train, progress=False, checkpoint=ckpt)
    monkeypatch.setattr(training, "save_training_state", real)
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 1
    state["history"][0] = 123.0  # a marker the resumed fit must carry on
    real(ckpt, state)
    resumed = DEFENSES.create("test_semantic_ae", **opts).fit(train, progress=False,
                                                              checkpoint=ckpt)
    assert resumed.history == pytest.approx([123.0] + full.history[1:])
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k
    real(ckpt, {"fingerprint": "another configuration", "epoch": 1})
    with pytest.raises(training.ResumeError, match="different training configuration"):
        DEFENSES.create("test_semantic_ae", **opts).fit(train, progress=False, checkpoint=ckpt)


def test_classifier_finetune_on_reconstructions(data, classifier):
    import copy

    train, test = data
    clf = copy.deepcopy(classifier)
    d = DEFENSES.create("test_semantic_ae", classifier=clf, epochs=1,
                        classifier_finetune_epochs=1, classifier_finetune_lr=0.01)
    d.fit(train, progress=False).eval()
    assert len(d.finetune_history) == 1
    assert d.fit_info["settings"]["classifier_finetune_epochs"] == 1
    assert not torch.equal(clf[1].weight, classifier[1].weight)  # it was trained
    with pytest.raises(ValueError, match="unknown preset"):
        DEFENSES.create("test_semantic_ae", classifier=classifier, preset="huge")


def test_standard_preset_settings():
    from defenses.semantic_autoencoder import AE_PRESETS

    d = DEFENSES.create("test_semantic_ae", classifier=nn.Sequential(nn.Flatten(),
                                                                     nn.Linear(768, 10)),
                        epochs=None)
    s = d.training_settings("standard")
    assert s["epochs"] == AE_PRESETS["standard"]["epochs"]
    assert s["classifier_finetune_epochs"] == 1


def test_semantic_ae_report_keys(fitted, data, tmp_path):
    sem, plain = fitted
    report = semantic_ae_report(sem, data[1], plain=plain, figure_path=tmp_path / "tsne",
                                max_points=80)
    for key in ("semantic", "semantic_predicted_label", "plain"):
        for metric in ("silhouette", "linear_probe_accuracy", "psnr", "ssim"):
            assert np.isfinite(report[key][metric])
    assert 0 <= report["semantic_predicted_label"]["classifier_accuracy"] <= 1
    assert (tmp_path / "tsne.png").stat().st_size > 0 and (tmp_path / "tsne.svg").stat().st_size > 0
    json.dumps(report)


# ----------------------------------------------------------------------------------------------
# latent metrics
# ----------------------------------------------------------------------------------------------
def _reference_ssim(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """Window-by-window SSIM (Wang et al. 2004) for one (C, H, W) image pair, data range 1."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    vals = []
    for ch in range(x.shape[0]):
        for i in range(x.shape[1] - size + 1):
            for j in range(x.shape[2] - size + 1):
                a, b = x[ch, i:i + size, j:j + size], y[ch, i:i + size, j:j + size]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * a * a).sum() - ma ** 2, (w * b * b).sum() - mb ** 2
                cov = (w * a * b).sum() - ma * mb
                vals.append(((2 * ma * mb + c1) * (2 * cov + c2))
                            / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_psnr_and_ssim():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 14, 14, generator=g)
    noisy = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    very = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert torch.isinf(psnr(x, x)).all()
    assert torch.allclose(ssim(x, x), torch.ones(3))
    assert (psnr(x, noisy) > psnr(x, very)).all() and (ssim(x, noisy) > ssim(x, very)).all()
    mse = (x - noisy).pow(2).flatten(1).mean(1)
    assert torch.allclose(psnr(x, noisy), -10 * torch.log10(mse))
    ref = _reference_ssim(x[0].double().numpy(), very[0].double().numpy())
    assert abs(float(ssim(x[:1], very[:1])) - ref) < 1e-4
    assert ssim(x, noisy, reduction="mean").dim() == 0
    with pytest.raises(ValueError):
        ssim(x, x[:, :, :10])


def test_separation_scores_blobs_vs_random_labels():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    centres = torch.tensor([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]])
    z = centres[labels] + torch.randn(300, 2, generator=g)
    good = separation_scores(z, labels)
    assert good["silhouette"] > 0.6 and good["linear_probe_accuracy"] > 0.95
    shuffled = labels[torch.randperm(300, generator=g)]
    bad = separation_scores(z, shuffled)
    assert bad["silhouette"] < 0.05 and bad["linear_probe_accuracy"] < 0.6
    with pytest.raises(ValueError):
        separation_scores(z, labels[:10])


def test_tsne_figure_writes_png_and_svg(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    sets = {"a": (torch.randn(60, 5, generator=g), labels),
            "b": (torch.randn(60, 5, generator=g) + labels[:, None], labels)}
    paths = tsne_figure(sets, tmp_path / "sub" / "fig", class_names=["x", "y", "z"])
    assert [p.suffix for p in paths] == [".png", ".svg"]
    assert all(p.exists() and p.stat().st_size > 1000 for p in paths)
    with pytest.raises(ValueError):
        tsne_figure({}, tmp_path / "none")


@pytest.mark.slow
def test_registry_defaults_build_with_the_zoo_classifier():
    d = DEFENSES.create("test_semantic_ae")
    assert d.config()["classifier"] == "test_tiny_cnn@tiny"
    assert DEFENSES.create("test_plain_ae").structure.preprocessor_differentiable


@pytest.mark.data
@pytest.mark.slow
def test_fits_and_evaluates_on_imagenet10_at_32px(shared_data):
    from bench.data import load_eval, load_train

    train = load_train("imagenet10", resolution=32, limit=200)
    test = load_eval("imagenet10", 50, resolution=32)
    clf = quick_classifier(train, steps=50)
    sem = DEFENSES.create("semantic_ae", dataset="imagenet10", resolution=32, classifier=clf,
                          epochs=1, widths=(16, 32, 32), latent_dim=32, hidden_dim=64)
    plain = DEFENSES.create("plain_ae", dataset="imagenet10", resolution=32, classifier=clf,
                            epochs=1, widths=(16, 32, 32), latent_dim=32, hidden_dim=64)
    for d in (sem, plain):
        d.fit(train, progress=False).eval()
        with torch.no_grad():
            out = d(test.images)
        assert out.shape == (50, 10) and torch.isfinite(out).all()
    report = semantic_ae_report(sem, test, plain=plain)
    assert np.isfinite(report["semantic"]["psnr"]) and np.isfinite(report["plain"]["ssim"])
