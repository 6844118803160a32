"""The matrix runner end to end on the smoke preset: store contents, content addressing,
resume after SIGKILL with no duplicated or lost rows, bad input that loses nothing."""

import os
import sqlite3
import subprocess
import sys

import pytest

from bench.core.config import load_config
from bench.core.store import ResultStore
from bench.harness.runner import MatrixRunner
from bench.harness.scoring import AttackContractError, check_adversarials
from leaderboard.table import build_records


def smoke(tmp_path, **over):
    cfg = load_config("smoke")
    cfg.run_dir = str(tmp_path / "run")
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def rows_by_cell(db):
    con = sqlite3.connect(db)
    out = {}
    done = "SELECT key, attack, threat FROM cells WHERE status='done'"
    for key, attack, threat in con.execute(done):
        out[(attack, threat)] = con.execute(
            "SELECT sample_id, clean_correct, adv_correct, robust, round(norm, 6) FROM samples "
            "WHERE cell_key=? ORDER BY idx", (key,)).fetchall()
    return out


def test_smoke_run_stores_every_cell_and_sample(tmp_path):
    cfg = smoke(tmp_path)
    s = MatrixRunner(cfg, progress=False, log=lambda m: None).run()
    store = ResultStore(tmp_path / "run" / "results.sqlite")
    # clean + pgd(linf) + pgd(l2) + cw(l2)
    assert s.cells_total == 4 and s.cells_computed == 4
    counts = store.counts()
    assert counts["cells"] == 4 and counts["samples"] == 4 * 20
    recs = build_records(store)
    assert {r["threat"] for r in recs} == {"linf", "l2"}
    for r in recs:
        assert r["worst_case"]["accuracy"] <= min(a["accuracy"] for a in r["attacks"].values())
        assert r["worst_case"]["accuracy"] <= r["clean"]["accuracy"]
        assert r["clean"]["ci_low"] <= r["clean"]["accuracy"] <= r["clean"]["ci_high"]
    # provenance is recorded with each cell
    c = store.cells()[1]
    for key in ("code_version", "packages", "device", "config_hash", "checkpoint_sha256",
                "sample_ids_sha256", "date"):
        assert key in c.provenance
    # a second run recomputes nothing (content addressing)
    again = MatrixRunner(cfg, progress=False, log=lambda m: None).run()
    assert again.cells_computed == 0 and again.cells_reused == 4
    assert store.counts() == counts
    # a changed input (epsilon) is a new cell, the old ones stay
    cfg.threat_models = {"linf": [4 / 255]}
    third = MatrixRunner(cfg, progress=False, log=lambda m: None).run()
    assert third.cells_computed == 1 and store.counts()["cells"] == 5


def test_worst_case_schedule_attacks_only_unbroken(tmp_path):
    cfg = smoke(tmp_path, schedule="worst-case", threat_models={"l2": [0.5]})
    MatrixRunner(cfg, progress=False, log=lambda m: None).run()
    store = ResultStore(tmp_path / "run" / "results.sqlite")
    cells = {c.attack: c for c in store.cells()}
    pgd_rows = store.samples(cells["test_pgd"].key)
    cw_rows = store.samples(cells["cw"].key)
    unbroken = {r["sample_id"] for r in pgd_rows if r["robust"]}
    assert {r["sample_id"] for r in cw_rows} == unbroken
    full = smoke(tmp_path / "full", threat_models={"l2": [0.5]})
    MatrixRunner(full, progress=False, log=lambda m: None).run()
    wc = {r["defense"]: r["worst_case"]["k"] for r in build_records(store)}
    wf = {r["defense"]: r["worst_case"]["k"] for r in
          build_records(ResultStore(tmp_path / "full" / "run" / "results.sqlite"))}
    assert wc == wf  # same headline number, fewer attack runs


@pytest.mark.parametrize("kill_after", [1, 3])
def test_killed_run_resumes_without_duplicates_or_losses(tmp_path, kill_after):
    ref = smoke(tmp_path / "ref")
    MatrixRunner(ref, progress=False, log=lambda m: None).run()
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "bench", "run", "smoke", "--run-dir", str(run_dir),
           "--no-progress"]
    env = {**os.environ, "ROBUSTMATRIX_KILL_AFTER_BATCHES": str(kill_after)}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == -9, first.stderr[-2000:]
    con = sqlite3.connect(run_dir / "results.sqlite")
    assert con.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == kill_after
    con.close()
    env.pop("ROBUSTMATRIX_KILL_AFTER_BATCHES")
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert rows_by_cell(run_dir / "results.sqlite") == rows_by_cell(
        tmp_path / "ref" / "run" / "results.sqlite")
    con = sqlite3.connect(run_dir / "results.sqlite")
    dup = con.execute("SELECT COUNT(*) FROM (SELECT cell_key, sample_id, COUNT(*) c FROM samples "
                      "GROUP BY 1, 2 HAVING c > 1)").fetchone()[0]
    assert dup == 0
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_adversarial_check_is_independent_of_the_attack():
    import torch

    x = torch.full((2, 3, 4, 4), 0.5)
    adv = x + 0.1
    with pytest.raises(AttackContractError, match="outside the linf ball"):
        check_adversarials(adv, x, 8 / 255, "linf", False, "bad")
    fixed, norm = check_adversarials(adv, x, 8 / 255, "linf", True, "cw")  # minimal-norm
    assert torch.equal(fixed, x) and (norm == 0).all()
    with pytest.raises(AttackContractError, match="NaN"):
        check_adversarials(x * float("nan"), x, 8 / 255, "linf", False, "bad")


@pytest.mark.data
@pytest.mark.slow
def test_every_seed_defense_fits_and_runs_in_the_matrix_on_imagenet10(shared_data, tmp_path):
    """ImageNet-10 (the local Imagenette tree) at a configurable resolution (32 px here): every
    seed defense is fitted by the harness (tiny settings, 200-300 training images) and evaluated
    by the matrix runner, with the adaptive attacks its structure calls for."""
    from bench.core.config import config_from_dict

    if not (shared_data / "imagenette-224").is_dir():
        pytest.skip("no Imagenette tree in the shared data folder")
    small_clf = {"classifier": "test_tiny_cnn@tiny", "epochs": 1, "widths": [16, 32],
                 "latent_dim": 16, "hidden_dim": 64, "batch_size": 50}
    at = {"arch": "test_tiny_cnn", "epochs": 1, "batch_size": 100, "train_limit": 200}
    cfg = config_from_dict({
        "name": "in10", "datasets": [{"name": "imagenet10", "n": 20, "resolution": 32}],
        "defenses": [
            {"name": "pgd_at", **at}, {"name": "spat", **at},
            {"name": "semantic_ae", **small_clf, "train_limit": 200},
            {"name": "aae_detector", **small_clf, "train_limit": 300, "disc_hidden": 64,
             "calibration_fraction": 0.2},
            {"name": "srd", **at, "batch_size": 50, "num_filters": 8, "filter_size": 6,
             "dict_iterations": 4, "dict_images_per_cluster": 32, "coding_iterations": 10,
             "max_clusters": 2, "kmeans_init": 2}],
        "attacks": [{"name": "test_pgd"}], "threat_models": {"linf": []}, "batch_size": 20,
        # the default checks are tested on their own (tests/test_evidence.py, test_checklist.py)
        "checks": {"defaults": False},
        "fit_preset": "tiny", "device": "cpu", "run_dir": str(tmp_path / "run")})
    summary = MatrixRunner(cfg, progress=False, log=lambda m: None).run()
    assert not summary.errors
    store = ResultStore(tmp_path / "run" / "results.sqlite")
    recs = {r["defense"]: r for r in build_records(store)}
    assert set(recs) == {"pgd_at", "spat", "semantic_ae", "aae_detector", "srd"}
    for r in recs.values():
        assert r["dataset"] == "imagenet10" and r["eps"] == pytest.approx(4 / 255)
        assert r["n"] == 20 and 0 <= r["worst_case"]["accuracy"] <= r["clean"]["accuracy"]
    assert {"bpda+test_pgd", "transfer test_pgd"} <= set(recs["srd"]["attacks"])
    assert {"bpda+test_pgd", "wrong-label latent"} <= set(recs["semantic_ae"]["attacks"])
    assert {"detector-aware test_pgd", "reject-class test_pgd"} <= set(
        recs["aae_detector"]["attacks"])
    clean = [c for c in store.cells() if c.attack == "clean"]
    assert all(c.provenance["artifact"]["artifact_sha256"] for c in clean)
