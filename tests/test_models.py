"""The model zoo: every registered architecture, checkpoints, pinned weights, training cache."""

from __future__ import annotations

import pytest
import torch

from bench.core.registry import MODELS, RegistryError
from bench.models import (
    PRETRAINED,
    RECIPES,
    CheckpointError,
    ChecksumError,
    Normalize,
    TrainRecipe,
    create_model,
    get_recipe,
    load_checkpoint,
    load_classifier,
    resolve_classifier,
    save_checkpoint,
    sha256_file,
    state_dict_sha256,
    verify_sha256,
)
from bench.models.pretrained import weights_file
from bench.models.training import augment, balanced_subset, evaluate_accuracy

ARCHS = MODELS.list()
HTML = (b"<!DOCTYPE html>\n<html lang='en'><head><title>GitHub</title></head>"
        b"<body>...</body></html>\n")


@pytest.fixture(autouse=True)
def one_thread():
    """These small models run as fast on one thread, and far faster when other jobs share the
    CPU (two threads per process then spin against each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _input_size(arch: str) -> int:
    return 16 if arch.startswith("test_") else 32


# -- architectures -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_takes_unit_range_inputs(arch):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=7).eval()
    assert model.num_classes == 7 and model.arch == arch
    assert isinstance(next(iter(model.children())), Normalize), "first module must normalise"
    size = 32 if arch == "locuslab_small_cnn" else _input_size(arch)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        logits, latent = model(x), model.features(x)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    assert latent.shape == (2, model.feature_dim)
    # the registry rebuilds the same architecture from the metadata a checkpoint stores
    rebuilt = create_model(arch, num_classes=7, **model.arch_kwargs)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("arch,size", [("test_tiny_cnn", 32), ("resnet20", 40),
                                       ("resnet18_imagenet", 64)])
def test_other_resolutions(arch, size):
    model = create_model(arch).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, size, size)).shape == (1, 10)


def test_normalisation_is_inside_the_model():
    model = create_model("test_tiny_cnn", mean=(0.2, 0.3, 0.4), std=(0.5, 0.5, 0.5)).eval()
    x = torch.rand(2, 3, 16, 16)
    expected = (x - torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)) / 0.5
    assert torch.allclose(model.normalize(x), expected)
    assert model.arch_kwargs == {"mean": pytest.approx([0.2, 0.3, 0.4]), "std": [0.5] * 3}


def test_cifar_resnet_layout_is_akamasters():
    keys = set(create_model("resnet20").state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer3.2.bn2.bias",
            "linear.weight", "normalize.mean"} <= keys
    assert not any("shortcut" in k or "downsample" in k for k in keys)  # option A: no weights
    assert sum(k.endswith(".conv1.weight") for k in create_model("resnet56").state_dict()) == 27


# -- checkpoints -------------------------------------------------------------------------------
def _tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("test_tiny_cnn", mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    for m in model.modules():  # non-trivial BN statistics, so they must round-trip too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_checkpoint_round_trip(tmp_path):
    model = _tiny_model()
    config = {"dataset": "test_tiny", "recipe": {"epochs": 1}, "train_fingerprint": "abc",
              "accuracy": {"clean_accuracy": 0.5}}
    sha = save_checkpoint(model, tmp_path / "m.safetensors", config)
    assert sha == sha256_file(tmp_path / "m.safetensors")
    loaded, cfg = load_checkpoint(tmp_path / "m.safetensors", sha256=sha)
    assert not loaded.training and cfg["arch"] == "test_tiny_cnn" and cfg["num_classes"] == 10
    assert cfg["dataset"] == "test_tiny" and cfg["accuracy"] == {"clean_accuracy": 0.5}
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    # same weights and config -> same bytes -> same sha256
    assert save_checkpoint(loaded, tmp_path / "again.safetensors", config) == sha
    assert state_dict_sha256(loaded) == state_dict_sha256(model)
    assert load_classifier(str(tmp_path / "m.safetensors"), dataset="test_tiny")[1] == sha


def test_checksum_mismatch_names_file_hashes_and_fix(tmp_path):
    path = tmp_path / "m.safetensors"
    sha = save_checkpoint(_tiny_model(), path, {})
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as info:
        load_checkpoint(path, sha256=wrong)
    msg = str(info.value)
    assert str(path) in msg and wrong in msg and sha in msg and "download" in msg
    assert "\n" not in msg and isinstance(info.value, ValueError)
    assert verify_sha256(path, sha.upper()) == sha


def test_html_page_saved_as_checkpoint_is_refused(tmp_path):
    page = tmp_path / "resnet20.safetensors"
    page.write_bytes(HTML)
    with pytest.raises(CheckpointError, match="HTML page"):
        load_checkpoint(page)
    with pytest.raises(ChecksumError, match="HTML page.*delete the file"):
        load_checkpoint(page, sha256="1" * 64)


def test_html_page_in_place_of_pinned_weights(tmp_path, monkeypatch):
    entry = PRETRAINED["akamaster-resnet20"]
    (tmp_path / entry.filename).write_bytes(HTML)
    monkeypatch.setenv("ROBUSTMATRIX_WEIGHTS", str(tmp_path))
    with pytest.raises(ChecksumError) as info:
        load_classifier("akamaster-resnet20", dataset="cifar10")
    msg = str(info.value)
    assert entry.filename in msg and entry.sha256 in msg and "HTML page" in msg


# -- specs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,suggestion", [("resnet20@quik", "resnet20@quick"),
                                             ("akamaster-resnet2", "akamaster-resnet20"),
                                             ("resnet21@quick", "resnet20@quick")])
def test_unknown_spec_suggests(spec, suggestion):
    with pytest.raises(RegistryError) as info:
        load_classifier(spec, dataset="cifar10")
    assert "did you mean" in str(info.value) and repr(suggestion) in str(info.value)


def test_pinned_model_on_the_wrong_dataset():
    with pytest.raises(ValueError, match="cifar10 model"):
        load_classifier("akamaster-resnet20", dataset="imagenet10")


def test_module_passes_through():
    model = _tiny_model()
    out, sha = resolve_classifier(model, dataset="test_tiny")
    assert out is model and sha == state_dict_sha256(model) and len(sha) == 64
    assert state_dict_sha256(_tiny_model(seed=1)) != sha


# -- training pieces ---------------------------------------------------------------------------
def test_augment_is_seeded_and_shape_preserving():
    x = torch.rand(8, 3, 16, 16)
    a = augment(x, padding=2, flip=True, generator=torch.Generator().manual_seed(1))
    b = augment(x, padding=2, flip=True, generator=torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    same = augment(x, padding=0, flip=False, generator=torch.Generator())
    assert torch.equal(same, x)


def test_balanced_subset():
    labels = torch.arange(10).repeat_interleave(50)
    keep = balanced_subset(labels, 100, seed=0)
    assert len(keep) == 100 and torch.bincount(labels[keep]).tolist() == [10] * 10


def test_recipes():
    assert {"tiny", "quick", "standard", "full"} <= set(RECIPES)
    assert RECIPES["quick"].limit and RECIPES["full"].limit is None
    with pytest.raises(ValueError):
        TrainRecipe(schedule="step")
    # ImageNet-10's standard recipe is its own (3,000 train images: small batches, 40 epochs)
    assert get_recipe("standard", "imagenet10").epochs == 40
    assert get_recipe("standard", "imagenet10").batch_size == 64
    assert get_recipe("standard", "cifar10") == RECIPES["standard"]


def test_a_shipped_classifier_loads_without_training_and_is_checked(monkeypatch, tmp_path):
    """`<arch>@<recipe>` with a shipped checkpoint loads it (no data, no training) and refuses
    a file that does not match its pinned sha256, naming the fix."""
    from bench.models import zoo

    model = MODELS.create("test_tiny_cnn", num_classes=10)
    path = tmp_path / "tiny.safetensors"
    sha = save_checkpoint(model, path, {"arch": "test_tiny_cnn", "num_classes": 10,
                                        "dataset": "test_tiny"})
    monkeypatch.setattr(zoo, "SHIPPED_DIR", tmp_path)
    monkeypatch.setattr(zoo, "SHIPPED", {("test_tiny_cnn", "tiny", "test_tiny"):
                                         ("tiny.safetensors", sha)})

    def no_training(*args, **kwargs):
        raise AssertionError("a shipped classifier must load, not train")

    monkeypatch.setattr(zoo, "train_classifier", no_training)
    monkeypatch.setattr("bench.data.load_train", no_training)
    loaded, got = load_classifier("test_tiny_cnn@tiny", dataset="test_tiny")
    assert got == sha == sha256_file(path)
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(loaded(x), model.eval()(x))
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(CheckpointError, match="pinned sha256.*git checkout"):
        load_classifier("test_tiny_cnn@tiny", dataset="test_tiny")
    path.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_classifier("test_tiny_cnn@tiny", dataset="test_tiny")


def test_tiny_training_is_cached(monkeypatch):
    data = pytest.importorskip("bench.data")
    model, sha = load_classifier("test_tiny_cnn@tiny", dataset="test_tiny")
    test = data.load_eval("test_tiny", 200, seed=0)
    accuracy = evaluate_accuracy(model, test)
    assert accuracy > 0.5, f"tiny recipe reached only {accuracy:.0%} on test_tiny"

    def no_training(*args, **kwargs):
        raise AssertionError("the second call must load the cached checkpoint")

    monkeypatch.setattr("bench.models.zoo.train_classifier", no_training)
    again, sha_again = load_classifier("test_tiny_cnn@tiny", dataset="test_tiny")
    assert sha_again == sha
    assert evaluate_accuracy(again, test) == accuracy


# -- pinned third-party weights on the shared data ---------------------------------------------
def _pinned(name: str) -> str:
    try:
        weights_file(PRETRAINED[name], download=False)
    except FileNotFoundError:
        pytest.skip(f"weights for {name} are not in any weights root")
    return name


@pytest.fixture(scope="module")
def lossless_100(shared_data):
    from bench.data import load_split

    test = load_split("cifar10", "test", source="lossless-csv")
    assert len(test) == 100
    return test.images, test.labels


# figures from METHODS.md "Reference figures"
@pytest.mark.parametrize("name,expected", [("akamaster-resnet20", 0.94),
                                           ("akamaster-resnet56", 0.96),
                                           ("locuslab-cifar-small", 0.40)])
def test_pinned_weights_reproduce_reference_accuracy(name, expected, lossless_100):
    model, sha = load_classifier(_pinned(name), dataset="cifar10")
    assert sha == PRETRAINED[name].sha256 and not model.training
    images, labels = lossless_100
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert accuracy == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_akamaster_resnet20_on_1000_jpeg_test_images(shared_data):
    from bench.data import load_split

    test = load_split("cifar10", "test", source="jpeg-tree")
    # the first 100 per class, as in METHODS.md (ids end in the position within the class)
    first = [i for i, sid in enumerate(test.sample_ids) if int(sid.rsplit("/", 1)[1]) < 100]
    test = test.subset(first)
    assert len(test) == 1000
    model, _ = load_classifier(_pinned("akamaster-resnet20"), dataset="cifar10")
    assert evaluate_accuracy(model, test, batch_size=250) == pytest.approx(0.804, abs=1e-6)


@pytest.mark.data
def test_the_shipped_imagenet10_classifier_loads_without_training(shared_data, monkeypatch):
    """The undefended ImageNet-10 classifier the AEs and baselines sit in front of comes with
    the project: a fresh clone loads it (sha256-checked) and it classifies the Imagenette
    validation images (73.0% on 1,000 in its model card; >= 60% asserted on 200)."""
    if not (shared_data / "imagenette-224").is_dir():
        pytest.skip("no Imagenette tree in the shared data folder")
    from bench.data import load_eval
    from defenses.undefended import Undefended

    def no_training(*args, **kwargs):
        raise AssertionError("the shipped classifier must load, not train")

    monkeypatch.setattr("bench.models.zoo.train_classifier", no_training)
    d = Undefended(dataset="imagenet10", preset="standard")
    assert d.classifier_spec == "resnet20_s2@standard"
    test = load_eval("imagenet10", 200, seed=0, resolution=64)
    assert evaluate_accuracy(d.classifier, test) >= 0.6
