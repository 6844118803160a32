"""Executors (bench/harness/executors.py): the Ray executor stores exactly what the local one
stores, a killed Ray run resumes to the same results, the GPU path's switches, cost accounting.

Ray tests skip cleanly where ray is not importable; GPU tests carry ``@pytest.mark.gpu``.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.core.config import ConfigError, config_from_dict, load_config
from bench.core.store import ResultStore
from bench.harness.executors import (
    AttackView,
    ExecutorError,
    LocalExecutor,
    acceleration,
    make_executor,
    resolve_batch_size,
)
from bench.harness.runner import MatrixRunner

REPO = Path(__file__).resolve().parent.parent


def smoke(run_dir: Path, **over):
    cfg = load_config("smoke")
    cfg.run_dir = str(run_dir)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def run(cfg):
    return MatrixRunner(cfg, progress=False, log=lambda m: None).run()


def stored(run_dir: Path) -> dict:
    """Everything a run stored that must not depend on the executor, keyed by cell key."""
    con = sqlite3.connect(Path(run_dir) / "results.sqlite")
    out = {}
    for key, attack, threat, status, fwd, bwd in con.execute(
            "SELECT key, attack, threat, status, forward_passes, backward_passes FROM cells"):
        samples = con.execute("SELECT * FROM samples WHERE cell_key=? ORDER BY idx",
                              (key,)).fetchall()
        advs = con.execute("SELECT batch, adv_sha256 FROM batches WHERE cell_key=? ORDER BY "
                           "batch", (key,)).fetchall()
        out[key] = {"cell": (attack, threat, status, fwd, bwd), "samples": samples, "adv": advs}
    return out


# configuration and construction (no Ray needed) ----------------------------------------------
def test_executor_config_keys():
    base = {"defenses": ["test_undefended"], "attacks": ["test_pgd"]}
    cfg = config_from_dict({**base, "executor": {"name": "ray", "num_gpus": 0.25}})
    assert cfg.executor == "ray" and cfg.executor_options == {"num_gpus": 0.25}
    assert config_from_dict({**base, "batch_size": "auto"}).batch_size == "auto"
    for bad in ({"executor": "spark"}, {"executor": {"name": "ray", "gpus": 1}},
                {"executor_options": {"num_cpus": 2}}, {"amp": "yes"}, {"compile": "x"}):
        with pytest.raises(ConfigError):
            config_from_dict({**base, **bad})
    # the executor does not change results, so it is not part of the config hash
    assert config_from_dict({**base, "executor": "ray"}).config_hash() == \
        config_from_dict(base).config_hash()


def test_missing_ray_is_one_line_error(tmp_path):
    code = ("import sys; sys.modules['ray'] = None\n"
            "from bench.cli import main\n"
            f"sys.exit(main(['run', 'smoke', '--executor', 'ray', '--run-dir', "
            f"{str(tmp_path / 'run')!r}, '--no-progress']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.startswith("robustmatrix: error")]
    assert len(lines) == 1 and "pip install -e '.[ray]'" in lines[0], p.stderr


def test_local_executor_is_the_default_and_cpu_auto_batch():
    cfg = smoke(Path("/nonexistent"))
    ex = make_executor(cfg, device="cpu")
    assert isinstance(ex, LocalExecutor) and not ex.accel.active and ex.accel.key() == {}
    x = torch.rand(250, 3, 8, 8)
    assert resolve_batch_size("auto", torch.nn.Identity(), x, device="cpu") == 100
    assert resolve_batch_size("auto", torch.nn.Identity(), x[:7], device="cpu") == 7
    assert resolve_batch_size(32, torch.nn.Identity(), x, device="cpu") == 32
    with pytest.raises(ExecutorError):
        make_executor(smoke(Path("/x"), executor_options={"num_cpus": 1}), device="cpu")


def test_amp_view_scores_in_fp32_and_changes_the_key(tmp_path):
    """amp: true attacks through a bfloat16 autocast view (CPU autocast here); re-scoring is
    fp32, so every stored robust flag agrees with an fp32 forward on the stored adversarial."""
    from bench.harness.runner import load_adv

    cfg = smoke(tmp_path / "amp", amp=True, threat_models={"linf": [8 / 255]})
    accel = acceleration(cfg, "cpu")
    assert accel.amp is torch.bfloat16 and accel.key() == {"amp": "bfloat16"}
    run(cfg)
    plain = smoke(tmp_path / "plain", threat_models={"linf": [8 / 255]})
    run(plain)
    amp_cells = {c.attack: c for c in ResultStore(tmp_path / "amp" / "results.sqlite").cells()}
    plain_cells = {c.attack: c for c in ResultStore(tmp_path / "plain" / "results.sqlite").cells()}
    assert amp_cells["test_pgd"].key != plain_cells["test_pgd"].key  # amp is in the key
    assert amp_cells["clean"].forward_passes == plain_cells["clean"].forward_passes
    store = ResultStore(tmp_path / "amp" / "results.sqlite")
    from bench.artifacts import prepare_defense
    from bench.data import load_eval

    defense, _ = prepare_defense("test_undefended", {}, dataset="test_tiny", preset="tiny")
    data = load_eval("test_tiny", 20, seed=0)
    key = amp_cells["test_pgd"].key
    rows = store.samples(key)
    for b in store.batches(key):
        adv = load_adv(tmp_path / "amp", b["adv_path"], b["adv_sha256"])
        batch_rows = [r for r in rows if r["idx"] // 10 == b["batch"]]
        with torch.no_grad():
            pred = defense(adv).argmax(1)
        y = data.labels[[r["idx"] for r in batch_rows]]
        assert [bool(v) for v in (pred == y)] == [bool(r["adv_correct"]) for r in batch_rows]


def test_attack_view_passes_attributes_through():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    net(torch.rand(1, 3, 8, 8))
    net.structure = "declared"
    view = AttackView(net, acceleration(smoke(Path("/x"), amp="bf16"), "cpu"))
    out = view(torch.rand(2, 3, 8, 8))
    assert out.dtype == torch.float32 and out.shape == (2, 10)
    assert view.structure == "declared" and getattr(view, "0") is net[0]
    assert set(view.state_dict()) == {"defense." + k for k in net.state_dict()}


def test_show_cost_reports_the_stored_passes(tmp_path, capsys):
    from bench.cli import main

    cfg = smoke(tmp_path / "run", threat_models={"linf": [8 / 255]})
    run(cfg)
    store = ResultStore(tmp_path / "run" / "results.sqlite")
    pgd = next(c for c in store.cells() if c.attack == "test_pgd")
    # the per-sample shares sum to the exact totals the attack's tracer counted
    assert pgd.forward_passes == sum(e["forward_passes"] for e in store.batch_extras(pgd.key))
    assert pgd.backward_passes == sum(e["backward_passes"] for e in store.batch_extras(pgd.key))
    assert pgd.forward_passes > 0 and pgd.backward_passes > 0 and pgd.wall_time > 0
    assert main(["leaderboard", "--run-dir", str(tmp_path / "run"), "--show-cost",
                 "--out", str(tmp_path / "lb")]) == 0
    out = capsys.readouterr().out
    assert "Fwd passes" in out and "Bwd passes" in out and "Wall s" in out
    assert str(pgd.forward_passes) in out


# Ray ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_address():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.mark.parametrize("schedule", ["full", "worst-case"])
def test_ray_equals_local_row_for_row(tmp_path, ray_address, schedule):
    run(smoke(tmp_path / "local", schedule=schedule))
    s = run(smoke(tmp_path / "ray", schedule=schedule, executor="ray"))
    assert s.cells_computed == 4 and s.batches_computed > 0
    local, ray_ = stored(tmp_path / "local"), stored(tmp_path / "ray")
    assert set(local) == set(ray_)  # same cell keys: the executor is not an input
    for key in local:
        assert ray_[key] == local[key]  # samples, pass counts and adversarial sha256s
    prov = ResultStore(tmp_path / "ray" / "results.sqlite").cells()[1].provenance
    assert prov["executor"]["executor"] == "ray"


def test_ray_rebuild_transfer_equals_local(tmp_path, ray_address):
    cfg = smoke(tmp_path / "ray", executor="ray", executor_options={"defense_transfer": "rebuild"},
                threat_models={"l2": [0.5]})
    run(cfg)
    run(smoke(tmp_path / "local", threat_models={"l2": [0.5]}))
    assert stored(tmp_path / "ray") == stored(tmp_path / "local")


def test_killed_ray_run_resumes_to_the_same_results(tmp_path, ray_address):
    run_dir = tmp_path / "ray"
    cmd = [sys.executable, "-m", "bench", "run", "smoke", "--address", ray_address,
           "--run-dir", str(run_dir), "--no-progress"]
    env = {**os.environ, "ROBUSTMATRIX_KILL_AFTER_BATCHES": "3"}
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == -9, p.stderr[-2000:]
    store = ResultStore(run_dir / "results.sqlite")
    assert 0 < store.counts()["batches"] < 8
    assert len(store.cells("done")) < 4
    env.pop("ROBUSTMATRIX_KILL_AFTER_BATCHES")
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    run(smoke(tmp_path / "local"))
    assert stored(run_dir) == stored(tmp_path / "local")
    # no duplicated or lost rows
    assert ResultStore(run_dir / "results.sqlite").counts() == \
        ResultStore(tmp_path / "local" / "results.sqlite").counts()


# GPU -----------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_auto_batch_fills_the_device():
    from bench.artifacts import prepare_defense

    defense, _ = prepare_defense("test_undefended", {}, dataset="test_tiny", device="cuda",
                                 preset="tiny")
    x = torch.rand(5000, 3, 32, 32, device="cuda")
    bs = resolve_batch_size("auto", defense, x, device="cuda")
    assert bs == resolve_batch_size("auto", defense, x, device="cuda")  # stable: in the key
    assert 32 <= bs <= 4096 and bs & (bs - 1) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("over", [{}, {"amp": True}, {"amp": "fp16"}, {"compile": True}])
def test_gpu_path_runs_smoke(tmp_path, over):
    cfg = smoke(tmp_path / "run", device="cuda", batch_size="auto", **over)
    s = run(cfg)
    assert s.cells_computed == 4
    store = ResultStore(tmp_path / "run" / "results.sqlite")
    assert all(c.status == "done" for c in store.cells(None))
    prov = store.cells()[0].provenance
    assert prov["executor"]["acceleration"]["channels_last"] is True


@pytest.mark.gpu
def test_gpu_ray_equals_local_flags(tmp_path, ray_address):
    """On CUDA, kernels are not bit-reproducible across processes; the robust flags are."""
    run(smoke(tmp_path / "local", device="cuda"))
    run(smoke(tmp_path / "ray", device="cuda", executor="ray",
              executor_options={"num_gpus": 0.5}))
    lo, ra = stored(tmp_path / "local"), stored(tmp_path / "ray")
    assert set(lo) == set(ra)
