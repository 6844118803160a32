"""bench.data: the dataset interface, its sources, the decoded cache and the error messages.

Everything here runs in a few seconds on 2 CPU cores: trees are built in tmp_path with a few
images each, caches go to tmp_path, and the tests that read ../shared/data skip without it.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bench.data.core as core
from bench.core import paths
from bench.core.registry import DATASETS, list_datasets
from bench.data import (
    DataError,
    LabeledImages,
    dataset_info,
    load_eval,
    load_split,
    load_train,
)
from bench.data.cifar10 import CIFAR10_CLASSES, LOSSLESS_CSV
from bench.data.imagenet10 import IMAGENETTE_CLASSES

SHARED = paths.shared_data()
needs_cifar = pytest.mark.skipif(SHARED is None or not (SHARED / "cifar10-jpeg").is_dir(),
                                 reason="needs ../shared/data/cifar10-jpeg")
needs_csv = pytest.mark.skipif(SHARED is None or not (SHARED / LOSSLESS_CSV).is_file(),
                               reason="needs ../shared/data/" + LOSSLESS_CSV)
needs_imagenette = pytest.mark.skipif(
    SHARED is None or not (SHARED / "imagenette-224").is_dir(),
    reason="needs ../shared/data/imagenette-224")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """No test writes to the user's cache."""
    monkeypatch.setenv("ROBUSTMATRIX_CACHE", str(tmp_path / "cache"))


def make_cifar_tree(root: Path, per_class: int = 3, *, split: str = "test", ext: str = "png",
                    size: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """``root/cifar10-jpeg/<split>/<class>/NNNN.<ext>`` with random images; returns
    {sample id: HWC uint8 pixels}."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for label, cls in enumerate(CIFAR10_CLASSES):
        folder = root / "cifar10-jpeg" / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        for p in range(per_class):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / f"{p:04d}.{ext}")
            pixels[f"cifar10/{split}/{label}/{p:04d}"] = arr
    return pixels


# ----------------------------------------------------------------------------------------------
# registry and metadata
# ----------------------------------------------------------------------------------------------
def test_registry_has_the_builtin_datasets():
    assert {"cifar10", "imagenet10", "test_tiny"} <= set(list_datasets())
    assert "test_tiny" not in list_datasets(include_test=False)


def test_dataset_info():
    c = dataset_info("cifar10")
    assert (c.num_classes, c.image_size, c.shape) == (10, 32, (3, 32, 32))
    assert c.classes[0] == "airplane" and c.classes[9] == "truck"
    assert c.default_eps == pytest.approx({"linf": 8 / 255, "l2": 0.5})
    i = dataset_info("imagenet10")
    assert i.image_size == 64 and i.classes[0] == "tench" and i.classes[-1] == "parachute"
    assert i.default_eps == pytest.approx({"linf": 4 / 255, "l2": 1.0})
    assert dataset_info("imagenet10", resolution=112).image_size == 112
    assert DATASETS.create("imagenet10", resolution=224).info().image_size == 224
    assert dataset_info("test_tiny").shape == (3, 16, 16)


# ----------------------------------------------------------------------------------------------
# test_tiny, balanced eval subsets, LabeledImages
# ----------------------------------------------------------------------------------------------
def test_tiny_is_deterministic_and_balanced():
    a, b = load_split("test_tiny", "test"), load_split("test_tiny", "test")
    assert a.source == "synthetic" and a.images.shape == (500, 3, 16, 16)
    assert a.images.dtype == torch.float32 and a.labels.dtype == torch.int64
    assert 0 <= a.images.min() and a.images.max() <= 1
    assert torch.equal(a.images, b.images) and a.fingerprint == b.fingerprint
    assert a.class_counts() == [50] * 10
    assert len(set(a.sample_ids)) == 500 and a.sample_ids[0] == "test_tiny/test/0/0000"
    train = load_split("test_tiny", "train")
    assert len(train) == 2000 and train.fingerprint != a.fingerprint
    assert not torch.equal(train.images[:500], a.images)


def test_load_eval_balanced_and_seeded():
    a = load_eval("test_tiny", 23, seed=0)
    assert len(a) == 23 and a.class_counts() == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert load_eval("test_tiny", 23, seed=0).sample_ids == a.sample_ids
    b = load_eval("test_tiny", 23, seed=1)
    assert b.sample_ids != a.sample_ids and b.fingerprint != a.fingerprint
    assert b.class_counts() == a.class_counts()
    # stable order: the split's (class-major) order
    full = load_split("test_tiny")
    pos = [full.sample_ids.index(s) for s in a.sample_ids]
    assert pos == sorted(pos)
    assert torch.equal(a.images, full.images[pos]) and torch.equal(a.labels, full.labels[pos])
    assert a.class_counts() == [int((a.labels == c).sum()) for c in range(10)]


def test_load_train_limit():
    full = load_train("test_tiny")
    assert len(full) == 2000 and full.split == "train"
    small = load_train("test_tiny", limit=50, seed=3)
    assert small.class_counts() == [5] * 10
    assert load_train("test_tiny", limit=50, seed=3).sample_ids == small.sample_ids
    assert len(load_train("test_tiny", limit=10**6)) == 2000


def test_subset_forms_and_fingerprint():
    data = load_split("test_tiny")
    s1 = data.subset([3, 1, 2])
    assert s1.sample_ids == [data.sample_ids[i] for i in (3, 1, 2)]
    assert torch.equal(s1.images, data.images[[3, 1, 2]])
    assert data.subset(slice(1, 4)).sample_ids == data.sample_ids[1:4]
    mask = data.labels == 2
    assert data.subset(mask).class_counts()[2] == 50
    assert data.subset(torch.tensor([1, 2, 3])).fingerprint == data.subset(slice(1, 4)).fingerprint
    assert s1.fingerprint != data.fingerprint and isinstance(s1, LabeledImages)


@pytest.mark.slow
def test_tiny_is_learnable_quickly():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: extra threads only add contention
    try:
        _train_tiny_and_check()
    finally:
        torch.set_num_threads(threads)


def _train_tiny_and_check():
    torch.manual_seed(0)
    train, test = load_train("test_tiny"), load_split("test_tiny", "test")
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(6):
        perm = torch.randperm(len(train))
        for i in range(0, len(train), 64):
            b = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(net(train.images[b]), train.labels[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (net(test.images).argmax(1) == test.labels).float().mean().item()
    assert acc > 0.8


# ----------------------------------------------------------------------------------------------
# class-folder trees and the decoded cache
# ----------------------------------------------------------------------------------------------
def test_tree_pixels_labels_and_ids(tmp_path):
    pixels = make_cifar_tree(tmp_path / "data")
    data = load_split("cifar10", root=tmp_path / "data", cache_dir=tmp_path / "c")
    assert data.source == "jpeg-tree" and len(data) == 30 and data.skipped == 0
    assert data.classes == CIFAR10_CLASSES
    assert data.sample_ids[:4] == ["cifar10/test/0/0000", "cifar10/test/0/0001",
                                   "cifar10/test/0/0002", "cifar10/test/1/0000"]
    for i, sid in enumerate(data.sample_ids):
        assert int(data.labels[i]) == int(sid.split("/")[2])
        got = (data.images[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, pixels[sid])  # PNG: lossless


def test_fingerprint_does_not_depend_on_the_location(tmp_path):
    make_cifar_tree(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a = load_split("cifar10", root=tmp_path / "a", cache_dir=tmp_path / "ca")
    b = load_split("cifar10", root=tmp_path / "b", cache_dir=tmp_path / "cb")
    assert a.fingerprint == b.fingerprint and torch.equal(a.images, b.images)
    # a split folder or a dataset folder passed directly as root (ImageFolder style)
    c = load_split("cifar10", root=tmp_path / "a" / "cifar10-jpeg", cache_dir=tmp_path / "ca")
    d = load_split("cifar10", root=tmp_path / "a" / "cifar10-jpeg" / "test",
                   cache_dir=tmp_path / "ca")
    assert c.fingerprint == d.fingerprint == a.fingerprint


def test_second_load_reads_the_cache(tmp_path, monkeypatch):
    make_cifar_tree(tmp_path / "data", ext="jpg")
    kw = dict(root=tmp_path / "data", cache_dir=tmp_path / "c")
    first = load_split("cifar10", **kw)
    assert len(list((tmp_path / "c" / "decoded").glob("*.safetensors"))) == 1

    def no_decoding(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(core, "_decode_image", no_decoding)
    second = load_split("cifar10", **kw)
    assert torch.equal(first.images, second.images) and first.sample_ids == second.sample_ids
    assert first.fingerprint == second.fingerprint
    # the tree changes -> the signature changes -> decoded again
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(
        tmp_path / "data" / "cifar10-jpeg" / "test" / "cat" / "0003.jpg")
    with pytest.raises(AssertionError, match="decoded again"):
        load_split("cifar10", **kw)


def test_grayscale_becomes_rgb_and_resolution_resizes(tmp_path):
    make_cifar_tree(tmp_path / "data", per_class=1)
    gray = tmp_path / "data" / "cifar10-jpeg" / "test" / "dog" / "0001.png"
    Image.fromarray(np.full((32, 32), 77, np.uint8), mode="L").save(gray)
    data = load_split("cifar10", root=tmp_path / "data", resolution=16,
                      cache_dir=tmp_path / "c")
    assert data.images.shape == (11, 3, 16, 16)
    i = data.sample_ids.index("cifar10/test/5/0001")
    assert torch.allclose(data.images[i], torch.full((3, 16, 16), 77 / 255))


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def test_missing_root_names_the_fix(tmp_path):
    with pytest.raises(DataError) as err:
        load_split("cifar10", root=tmp_path / "nowhere")
    msg = str(err.value)
    assert "CIFAR-10" in msg and "nowhere" in msg and "ROBUSTMATRIX_DATA" in msg
    assert "--data-root" in msg and "\n" not in msg
    with pytest.raises(DataError, match="Imagenette"):
        load_split("imagenet10", root=tmp_path, source="jpeg-tree")


@pytest.mark.parametrize("n", [0, -3])
def test_bad_n(n):
    with pytest.raises(DataError, match="positive"):
        load_eval("test_tiny", n)


def test_n_larger_than_the_split():
    with pytest.raises(DataError, match="only 500"):
        load_eval("test_tiny", 501)


def test_unknown_options():
    with pytest.raises(DataError, match="source"):
        load_split("test_tiny", source="jpeg")
    with pytest.raises(DataError, match="split"):
        load_split("test_tiny", "dev")
    with pytest.raises(DataError, match="on_bad_image"):
        load_split("test_tiny", on_bad_image="ignore")
    with pytest.raises(DataError, match="no source 'lossless-csv'"):
        load_split("imagenet10", source="lossless-csv")


def test_corrupt_image_error_or_skip(tmp_path):
    make_cifar_tree(tmp_path / "data")
    bad = tmp_path / "data" / "cifar10-jpeg" / "test" / "frog" / "0001.png"
    bad.write_bytes(b"this is not an image")
    kw = dict(root=tmp_path / "data", cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"frog.0001\.png"):
        load_split("cifar10", **kw)
    with pytest.warns(UserWarning, match="skipped 1 bad image"):
        data = load_split("cifar10", on_bad_image="skip", **kw)
    assert data.skipped == 1 and len(data) == 29
    assert "cifar10/test/6/0001" not in data.sample_ids
    # the cached decode remembers the bad file: "error" still refuses it
    with pytest.raises(DataError, match=r"frog.0001\.png"):
        load_split("cifar10", **kw)


def test_wrong_size_image(tmp_path):
    make_cifar_tree(tmp_path / "data", per_class=2)
    odd = tmp_path / "data" / "cifar10-jpeg" / "test" / "ship" / "0000.png"
    Image.fromarray(np.zeros((30, 28, 3), np.uint8)).save(odd)
    with pytest.raises(DataError, match=r"ship.0000\.png.*30x28, expected 32x32"):
        load_split("cifar10", root=tmp_path / "data", cache_dir=tmp_path / "c")
    with pytest.warns(UserWarning):
        data = load_split("cifar10", root=tmp_path / "data", cache_dir=tmp_path / "c",
                          on_bad_image="skip")
    assert data.skipped == 1 and data.class_counts()[8] == 1


def test_empty_and_missing_class_folders(tmp_path):
    make_cifar_tree(tmp_path / "data", per_class=2)
    for f in (tmp_path / "data" / "cifar10-jpeg" / "test" / "horse").iterdir():
        f.unlink()
    kw = dict(root=tmp_path / "data", cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="horse has no images"):
        load_split("cifar10", **kw)
    with pytest.warns(UserWarning, match="horse has no images"):
        data = load_split("cifar10", on_bad_image="skip", **kw)
    assert data.class_counts()[7] == 0 and len(data) == 18
    with warnings.catch_warnings():  # an empty class gives its share to the next classes
        warnings.simplefilter("ignore")
        ev = load_eval("cifar10", 10, on_bad_image="skip", **kw)
    assert ev.class_counts() == [2, 1, 1, 1, 1, 1, 1, 0, 1, 1]
    (tmp_path / "data" / "cifar10-jpeg" / "test" / "horse").rmdir()
    with pytest.raises(DataError, match="horse missing"):
        load_split("cifar10", **kw)


# ----------------------------------------------------------------------------------------------
# torchvision sources (faked: no network here)
# ----------------------------------------------------------------------------------------------
def test_torchvision_cifar_ids_match_the_tree_convention(tmp_path, monkeypatch):
    import torchvision.datasets

    targets = [3, 8, 8, 0, 3, 1, 0, 9, 3, 2]
    pixels = np.random.default_rng(0).integers(0, 256, (len(targets), 32, 32, 3), np.uint8)
    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((Path(root), train, download))
            self.data, self.targets = pixels, targets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    data = load_split("cifar10", source="torchvision", root=tmp_path / "empty",
                      cache_dir=tmp_path / "c", download=True)
    assert calls == [(tmp_path / "c" / "data", False, True)]
    assert data.source == "torchvision"
    # original image 4 is the second cat: id cifar10/test/3/0001
    i = data.sample_ids.index("cifar10/test/3/0001")
    got = (data.images[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, pixels[4])
    assert data.sample_ids[:3] == ["cifar10/test/0/0000", "cifar10/test/0/0001",
                                   "cifar10/test/1/0000"]
    assert data.labels.tolist() == sorted(targets)
    # without download and without files: a clear error
    with pytest.raises(DataError, match="allow download"):
        load_split("cifar10", source="torchvision", root=tmp_path / "empty", download=False)


def test_torchvision_imagenette_tree(tmp_path):
    for wnid, _ in IMAGENETTE_CLASSES:
        folder = tmp_path / "imagenette2-320" / "val" / wnid
        folder.mkdir(parents=True)
        Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(folder / "x_0001.JPEG")
    data = load_split("imagenet10", root=tmp_path, resolution=24, cache_dir=tmp_path / "c")
    assert data.source == "torchvision" and data.images.shape == (10, 3, 24, 24)
    assert data.sample_ids[0] == "imagenet10/test/0/x_0001"


# ----------------------------------------------------------------------------------------------
# the shared development data
# ----------------------------------------------------------------------------------------------
@needs_csv
def test_lossless_csv_is_pixel_exact():
    rows = np.loadtxt(SHARED / LOSSLESS_CSV, delimiter=",", dtype=np.int64)
    data = load_split("cifar10", source="lossless-csv")
    assert data.source == "lossless-csv" and len(data) == 100
    assert data.classes == CIFAR10_CLASSES  # airplane=0 ... truck=9
    assert data.sample_ids[0] == "cifar10/test/0/0000"
    seen = [0] * 10
    for row in rows:  # id of row r: its label and its position within that label
        label = int(row[0])
        sid = f"cifar10/test/{label}/{seen[label]:04d}"
        seen[label] += 1
        i = data.sample_ids.index(sid)
        assert int(data.labels[i]) == label
        expected = torch.from_numpy(row[1:].reshape(32, 32, 3)).permute(2, 0, 1)
        assert torch.equal((data.images[i] * 255).round().long(), expected)
    assert rows[0, 0] == 3  # the first test image is a cat
    # its classes are unbalanced (6 to 16 images): n = 100 still gives all of it
    every = load_eval("cifar10", 100, source="lossless-csv")
    assert sorted(every.sample_ids) == sorted(data.sample_ids)
    assert load_eval("cifar10", 60, source="lossless-csv").class_counts() == [6] * 10
    with pytest.raises(DataError, match="test images only"):
        load_split("cifar10", "train", source="lossless-csv")


@needs_csv
@needs_cifar
def test_lossless_csv_matches_the_jpeg_tree():
    data = load_split("cifar10", source="lossless-csv")
    jpeg = []
    for sid in data.sample_ids:
        _, _, label, stem = sid.split("/")
        path = SHARED / "cifar10-jpeg" / "test" / CIFAR10_CLASSES[int(label)] / f"{stem}.jpg"
        jpeg.append(core._decode_image(path, 32, 32))
    jpeg = torch.stack(jpeg).float() / 255
    mae = (jpeg - data.images).abs().mean(dim=(1, 2, 3))
    assert mae.mean() < 10 / 255 and mae.max() < 16 / 255, mae * 255  # JPEG q75: ~6/255
    # and an unrelated pairing is far apart: the ids really do match
    assert (jpeg - data.images.roll(1, 0)).abs().mean() > 30 / 255


@needs_imagenette
def test_imagenet10_at_resolution_32(tmp_path):
    val = SHARED / "imagenette-224" / "val"
    for wnid, _ in IMAGENETTE_CLASSES:
        (tmp_path / "val" / wnid).mkdir(parents=True)
        for f in sorted((val / wnid).iterdir())[:2]:
            (tmp_path / "val" / wnid / f.name).symlink_to(f)
    data = load_split("imagenet10", "test", root=tmp_path, resolution=32,
                      cache_dir=tmp_path / "c")
    assert data.images.shape == (20, 3, 32, 32) and data.class_counts() == [2] * 10
    assert data.source == "jpeg-tree" and data.classes[0] == "tench"
    first = sorted((val / IMAGENETTE_CLASSES[0][0]).iterdir())[0].stem
    assert data.sample_ids[0] == f"imagenet10/test/0/{first}"
    assert 0.05 < data.images.mean() < 0.95
    ev = load_eval("imagenet10", 10, root=tmp_path, resolution=32, cache_dir=tmp_path / "c")
    assert ev.class_counts() == [1] * 10


@pytest.mark.slow
@needs_cifar
def test_full_cifar10_test_split(tmp_path):
    data = load_eval("cifar10", 100, seed=0, cache_dir=tmp_path / "c")
    assert data.source == "jpeg-tree" and data.class_counts() == [10] * 10
    full = load_split("cifar10", cache_dir=tmp_path / "c")
    assert len(full) == 10_000 and full.class_counts() == [1000] * 10
