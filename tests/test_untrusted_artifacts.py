"""Untrusted artifacts (docs/reliability.md): weights, checkpoints, defense artifacts and data
files are parsed only through safetensors or ``torch.load(weights_only=True)``, and pinned files
only after their sha256 matches. A crafted pickle whose ``__reduce__`` would run code (here:
write a marker file) is refused on every path, and the marker never appears; so is an HTML
page saved in place of the file.

The HTML-page and checksum-mismatch messages of the pinned-weights path are tested in
tests/test_models.py; this file adds the code-execution payloads and the other entry points.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch

from bench.artifacts import ArtifactError, load_artifact, prepare_defense
from bench.models import CheckpointError, ChecksumError, load_checkpoint, load_classifier
from bench.models.pretrained import PRETRAINED, PretrainedEntry, load_pretrained

HTML = b"<!DOCTYPE html>\n<html><head><title>GitHub</title></head><body>Sign in</body></html>\n"


class Payload:
    """Unpickling this writes ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def evil_files(folder: Path) -> dict[str, tuple[Path, Path]]:
    """{kind: (file, its marker)}: a torch zip checkpoint, a legacy (non-zip) torch file like the
    pinned .th files, a bare pickle, and a pickle named .safetensors; each carries a payload
    beside (or instead of) real tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    state = {"conv.weight": torch.zeros(2, 3, 3, 3)}
    for kind in ("zip", "legacy", "pickle", "renamed"):
        marker = folder / f"{kind}.marker"
        obj = {"state_dict": {**state, "evil": Payload(marker)}, "best_prec1": 91.7}
        path = folder / {"zip": "evil.pth", "legacy": "evil.th", "pickle": "evil.pkl",
                         "renamed": "evil.safetensors"}[kind]
        if kind == "zip":
            torch.save(obj, path)
        elif kind == "legacy":
            torch.save(obj, path, _use_new_zipfile_serialization=False)
        else:
            path.write_bytes(pickle.dumps(obj))
        out[kind] = (path, marker)
    return out


@pytest.fixture
def evil(tmp_path):
    return evil_files(tmp_path / "evil")


def test_the_payloads_are_live(tmp_path):
    """Control: a plain unpickler DOES run them (they only write a marker in tmp_path)."""
    files = evil_files(tmp_path / "control")
    path, marker = files["pickle"]
    pickle.loads(path.read_bytes())
    assert marker.exists()
    path, marker = files["zip"]
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_pinned_weights_checksum_comes_first(evil, monkeypatch):
    """The pinned path: a payload in place of the weights fails the sha256 check before any
    byte is unpickled; even when a catalog entry is made to trust its sha256,
    ``weights_only=True`` refuses it."""
    import bench.models.pretrained as pretrained

    parsed = []
    real_load = torch.load
    monkeypatch.setattr(pretrained.torch, "load",
                        lambda *a, **k: parsed.append(a) or real_load(*a, **k))
    entry = PRETRAINED["akamaster-resnet20"]
    for kind, (path, marker) in evil.items():
        with pytest.raises(ChecksumError, match="sha256 mismatch"):
            load_pretrained(entry, path=path)
        assert not parsed and not marker.exists(), kind
    from bench.models import sha256_file

    for kind in ("zip", "legacy"):
        path, marker = evil[kind]
        trusting = PretrainedEntry(**{**entry.__dict__, "sha256": sha256_file(path)})
        with pytest.raises(CheckpointError, match="refusing to unpickle") as info:
            load_pretrained(trusting, path=path)
        assert "\n" not in str(info.value)
        assert not marker.exists(), kind


def test_pinned_weights_found_in_a_weights_root(evil, tmp_path, monkeypatch):
    """A payload dropped into $ROBUSTMATRIX_WEIGHTS under the pinned file name."""
    root = tmp_path / "weights"
    root.mkdir()
    path, marker = evil["legacy"]
    (root / PRETRAINED["akamaster-resnet20"].filename).write_bytes(path.read_bytes())
    monkeypatch.setenv("ROBUSTMATRIX_WEIGHTS", str(root))
    with pytest.raises(ChecksumError):
        load_classifier("akamaster-resnet20", dataset="cifar10")
    assert not marker.exists()


def test_user_checkpoint_paths_are_safetensors_only(evil, tmp_path):
    page = tmp_path / "model.safetensors"
    page.write_bytes(HTML)
    for kind, (path, marker) in evil.items():
        with pytest.raises(CheckpointError) as info:
            load_classifier(str(path), dataset="test_tiny")
        assert "\n" not in str(info.value)
        with pytest.raises(CheckpointError):
            load_checkpoint(path)
        assert not marker.exists(), kind
    with pytest.raises(CheckpointError, match="HTML page"):
        load_classifier(str(page), dataset="test_tiny")


def test_defense_artifacts_are_safetensors_only(evil, tmp_path):
    """``artifact:`` given explicitly for a trainable defense (and load_artifact itself): a
    pickle, an HTML page and a safetensors file with the right metadata but foreign tensors
    are all refused with one line."""
    from safetensors.torch import save_file

    from bench.models import create_model, save_checkpoint

    clf = tmp_path / "clf.safetensors"  # an untrained tiny CNN: nothing to train here
    save_checkpoint(create_model("test_tiny_cnn", num_classes=10), clf, {"dataset": "test_tiny"})
    opts = {"calibration": 50, "classifier": str(clf)}
    defense, _ = prepare_defense("test_detector", opts, dataset="test_tiny", preset="tiny",
                                 log=lambda m: None)
    for kind, (path, marker) in evil.items():
        with pytest.raises(ArtifactError) as info:
            prepare_defense("test_detector", {**opts, "artifact": str(path)},
                            dataset="test_tiny", preset="tiny", log=lambda m: None)
        assert "\n" not in str(info.value)
        with pytest.raises(ArtifactError):
            load_artifact(defense, path)
        assert not marker.exists(), kind
    page = tmp_path / "artifact.safetensors"
    page.write_bytes(HTML)
    with pytest.raises(ArtifactError, match="not a robustmatrix artifact"):
        load_artifact(defense, page)
    # the right metadata (copied from a real artifact) over the wrong tensors
    from bench.artifacts import artifact_metadata

    meta = artifact_metadata(defense, "test_detector", dataset="test_tiny", resolution=None,
                             preset="tiny", train_fingerprint="x")
    forged = tmp_path / "forged.safetensors"
    save_file({"classifier.weight": torch.zeros(3, 3)}, str(forged), metadata=meta)
    with pytest.raises(ArtifactError) as info:
        load_artifact(defense, forged, meta)
    assert "\n" not in str(info.value) and "forged.safetensors" in str(info.value)


def test_a_forged_torchvision_cifar_folder_is_refused(tmp_path):
    """torchvision's CIFAR-10 reader unpickles its batch files, but only after their md5
    matches the published one: a payload there is refused (one line), never unpickled."""
    from bench.data import DataError, load_split

    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    marker = tmp_path / "cifar.marker"
    for name in ("test_batch", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                 "data_batch_5", "batches.meta"):
        (folder / name).write_bytes(pickle.dumps({"data": Payload(marker), "labels": [0]}))
    with pytest.raises(DataError) as info:
        load_split("cifar10", root=tmp_path / "data", source="torchvision",
                   cache_dir=tmp_path / "cache", download=False)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_the_sandbox_refuses_a_payload_as_a_result(tmp_path):
    """What a sandboxed submission hands back is read with weights_only=True too."""
    from bench.harness.submission.sandbox import run_isolated

    marker = tmp_path / "sandbox.marker"
    code = tmp_path / "submitted.py"
    code.write_text(
        "class P:\n"
        "    def __init__(self, m):\n"
        "        self.m = m\n"
        "    def __reduce__(self):\n"
        "        return (exec, (f'open({self.m!r}, \"w\")',))\n"
        "def run(m):\n"
        "    return {'logits': __import__('torch').zeros(2), 'extra': P(m)}\n")
    res = run_isolated(f"{code}:run", str(marker), timeout=60, memory_limit="1GiB", threads=1)
    assert res.status == "bad_result", res.message
    assert not marker.exists()


def test_no_unrestricted_unpickling_in_the_harness():
    """Every torch.load in the harness passes weights_only=True; nothing calls pickle.load."""
    import re

    root = Path(__file__).resolve().parent.parent
    offenders = []
    for folder in ("bench", "defenses", "attacks", "leaderboard"):
        for f in (root / folder).rglob("*.py"):
            for i, line in enumerate(f.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if "``" in code:  # documentation
                    continue
                if re.search(r"\btorch\.load\(", code) and "weights_only=True" not in code:
                    offenders.append(f"{f.relative_to(root)}:{i}")
                if re.search(r"\b(pickle|cPickle|dill|joblib)\.loads?\(", code):
                    offenders.append(f"{f.relative_to(root)}:{i}")
    assert not offenders, offenders


def test_io_buffer_payload_with_weights_only():
    """torch.load(weights_only=True) itself, on an in-memory payload (the primitive all of the
    above rely on)."""
    buf = io.BytesIO()
    marker = Path("/nonexistent-dir/never")
    torch.save({"x": torch.ones(1), "p": Payload(marker)}, buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buf, weights_only=True)


def test_an_artifact_fitted_for_another_dataset_or_resolution_is_refused(tmp_path):
    """A genuine artifact reused for another dataset, resolution or configuration is refused
    with one line that names the mismatch and the fix (`robustmatrix fit ...`), never loaded."""
    from bench.artifacts import artifact_metadata, save_artifact
    from bench.models import create_model, save_checkpoint

    clf = tmp_path / "clf.safetensors"
    save_checkpoint(create_model("test_tiny_cnn", num_classes=10), clf, {"dataset": "test_tiny"})
    opts = {"calibration": 50, "classifier": str(clf)}
    defense, _ = prepare_defense("test_detector", opts, dataset="test_tiny", preset="tiny",
                                 log=lambda m: None)
    meta = artifact_metadata(defense, "test_detector", dataset="test_tiny", resolution=None,
                             preset="tiny", train_fingerprint="x")
    good = tmp_path / "good.safetensors"
    save_artifact(defense, good, meta)
    load_artifact(defense, good, meta)  # the matching setting loads
    for field, other in (("dataset", "cifar10"), ("resolution", "64"),
                         ("config", '{"fpr": 0.01}')):
        with pytest.raises(ArtifactError) as info:
            load_artifact(defense, good, {**meta, field: other})
        msg = str(info.value)
        assert "\n" not in msg and f"trained for {field}=" in msg and "robustmatrix fit" in msg
    # through the harness: the same file named as the artifact of a 64-px run is refused
    with pytest.raises(ArtifactError, match="trained for resolution='None', not '64'"):
        prepare_defense("test_detector", {**opts, "artifact": str(good)}, dataset="test_tiny",
                        dataset_options={"resolution": 64}, preset="tiny", log=lambda m: None)
