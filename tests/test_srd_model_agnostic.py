"""The SRD purifier's model-agnostic claim as matrix rows (issue 14): the fitted purifier in
front of another classifier (``srd_front``) and the robust model alone (``srd_robust_model``),
both built from the SAME artifact as the ``srd`` row, attacked as their structure calls for."""

from __future__ import annotations

import json

import pytest
import torch

from bench.artifacts import prepare_defense
from bench.core.registry import DEFENSES

TINY = {"dataset": "test_tiny", "preset": "tiny", "srd_defense": "test_srd"}


@pytest.fixture(scope="module")
def tiny_srd():
    srd, info = prepare_defense("test_srd", {}, dataset="test_tiny", preset="tiny",
                                log=lambda m: None)
    return srd, info


def test_srd_front_is_the_srd_purifier_in_front_of_another_classifier(tiny_srd):
    from bench.models import load_classifier

    srd, info = tiny_srd
    front = DEFENSES.create("srd_front", classifier="test_tiny_cnn@tiny", **TINY).eval()
    other, sha = load_classifier("test_tiny_cnn@tiny", dataset="test_tiny")
    x = torch.rand(6, 3, 16, 16)
    with torch.no_grad():
        purified = srd.purifier(x)
        assert torch.allclose(front.preprocessor(x), purified)
        assert torch.allclose(front(x), other(purified), atol=1e-5)
        # the classifier behind is NOT the robust model (the claim would be untested)
        assert not torch.allclose(front(x), srd(x), atol=1e-3)
    s = front.structure
    assert s.has_preprocessor and not s.preprocessor_differentiable and s.has_surrogate
    cfg = front.config()
    assert cfg["classifier_sha256"] == sha
    assert cfg["srd"]["artifact_sha256"] == info["artifact_sha256"]  # the same SRD artifact
    json.dumps(cfg)  # it keys the cells


def test_srd_robust_model_is_the_robust_model_without_purifier(tiny_srd):
    srd, info = tiny_srd
    robust = DEFENSES.create("srd_robust_model", **TINY).eval()
    x = torch.rand(6, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(robust(x), srd.classifier(x))
    assert not robust.structure.has_preprocessor
    assert robust.config()["srd"]["artifact_sha256"] == info["artifact_sha256"]


def test_unknown_classifier_names_the_choices():
    from bench.core.registry import RegistryError

    with pytest.raises(RegistryError, match="unknown classifier"):
        DEFENSES.create("srd_front", classifier="no_such_model", **TINY)
    from defenses.undefended import behind_classifier

    with pytest.raises(ValueError, match="no undefended default"):
        behind_classifier("undefended", dataset="nowhere", resolution=None, device="cpu")
    assert behind_classifier("undefended", dataset="test_tiny", resolution=None,
                             device="cpu")[2] == "test_tiny_cnn@tiny"


def test_model_agnostic_rows_through_the_cli(tmp_path):
    """`robustmatrix run` with rows (a)-(d) and a JPEG baseline: the purifier rows get BPDA
    (surrogate and identity) and transfer attacks, the robust model alone a plain white-box
    attack; the leaderboard has every row."""
    import yaml

    from bench.cli import main
    from bench.core.store import ResultStore
    from leaderboard.table import build_records

    cfg = {"name": "srd_rows", "datasets": [{"name": "test_tiny", "n": 20}],
           "defenses": [
               {"name": "test_srd", "label": "(a) srd"},
               {"name": "srd_front", "srd_defense": "test_srd", "classifier": "test_tiny_cnn@tiny",
                "label": "(b) srd + undefended"},
               {"name": "srd_robust_model", "srd_defense": "test_srd", "label": "(d) robust"},
               {"name": "test_jpeg", "label": "jpeg"}],
           "attacks": ["test_pgd"], "threat_models": {"linf": [8 / 255]}, "batch_size": 20,
           "checks": {"defaults": False}, "fit_preset": "tiny", "device": "cpu"}
    path = tmp_path / "rows.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    assert main(["run", str(path), "--run-dir", str(run_dir), "--no-progress"]) == 0
    recs = {r["defense"]: r for r in build_records(ResultStore(run_dir / "results.sqlite"))}
    assert set(recs) == {"(a) srd", "(b) srd + undefended", "(d) robust", "jpeg"}
    for label in ("(a) srd", "(b) srd + undefended"):
        attacks = set(recs[label]["attacks"])
        assert {"bpda+test_pgd", "bpda-identity+test_pgd", "transfer test_pgd"} <= attacks, attacks
    assert "test_pgd" in recs["(d) robust"]["attacks"]
    assert not any(a.startswith("bpda") for a in recs["(d) robust"]["attacks"])
