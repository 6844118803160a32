"""Determinism on the CPU (docs/reliability.md): the same config and seed give identical
per-sample results: every sample row, every stored adversarial tensor (sha256 of the file and of
the tensor bytes), every cell key, flag and metric, whether the run happens in a fresh process or
in one whose global random state was disturbed first. A different seed gives different results.
(GPU runs are not bitwise reproducible by default: see the docs.)"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.harness.submission.sandbox import run_isolated

ARGS = ["run", "smoke", "--no-progress", "--batch-size", "5"]
VOLATILE = ("wall", "time", "date", "created", "finished", "run_dir", "pid", "host", "duration")


def strip_volatile(obj):
    if isinstance(obj, dict):
        return {k: strip_volatile(v) for k, v in obj.items()
                if not any(w in str(k).lower() for w in VOLATILE)}
    if isinstance(obj, list):
        return [strip_volatile(v) for v in obj]
    return obj


def results(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    con = sqlite3.connect(run_dir / "results.sqlite")
    con.row_factory = sqlite3.Row
    try:
        samples = [tuple(r) for r in con.execute("SELECT * FROM samples ORDER BY cell_key, idx")]
        batches = []
        for r in con.execute("SELECT cell_key, batch, adv_path, adv_sha256 FROM batches "
                             "ORDER BY cell_key, batch"):
            tensor_sha = None
            if r["adv_path"]:
                data = (run_dir / r["adv_path"]).read_bytes()
                assert hashlib.sha256(data).hexdigest() == r["adv_sha256"]
                t = load_file(str(run_dir / r["adv_path"]))["adv"]
                tensor_sha = hashlib.sha256(t.numpy().tobytes()).hexdigest()
            batches.append((r["cell_key"], r["batch"], r["adv_path"], r["adv_sha256"], tensor_sha))
        cells = [(r["key"], r["status"], r["adv_sha256"], r["forward_passes"],
                  r["backward_passes"], json.dumps(strip_volatile(json.loads(r["flags"] or "[]")),
                                                   sort_keys=True),
                  json.dumps(strip_volatile(json.loads(r["metrics"] or "{}")), sort_keys=True))
                 for r in con.execute("SELECT * FROM cells ORDER BY key")]
    finally:
        con.close()
    return {"samples": samples, "batches": batches, "cells": cells}


def child_run(run_dir: Path, *extra: str) -> dict:
    res = run_isolated("bench.cli:main", [*ARGS, "--run-dir", str(run_dir), *extra],
                       timeout=300, memory_limit=None, threads=1,
                       env={"ROBUSTMATRIX_CACHE": os.environ["ROBUSTMATRIX_CACHE"]},
                       label="robustmatrix run")
    assert res.ok and res.value == 0, res.message + "\n" + res.output_tail
    return results(run_dir)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    return child_run(tmp_path_factory.mktemp("det") / "a")


def test_two_fresh_processes_give_identical_results(first, tmp_path):
    second = child_run(tmp_path / "b")
    assert len(first["samples"]) >= 80 and sum(b[2] is not None for b in first["batches"]) >= 12
    assert second["samples"] == first["samples"]
    assert second["batches"] == first["batches"]
    assert second["cells"] == first["cells"]


def test_disturbed_global_random_state_changes_nothing(first, tmp_path):
    """In this (long-lived) process, after drawing from every global generator."""
    from bench.cli import main

    random.seed(12345)
    np.random.seed(12345)
    torch.manual_seed(12345)
    random.random(), np.random.rand(7), torch.rand(13), torch.randn(3, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*ARGS, "--run-dir", str(tmp_path / "c")]) == 0
    finally:
        torch.set_num_threads(threads)
    third = results(tmp_path / "c")
    assert third == first


def test_another_seed_gives_other_results(first, tmp_path):
    other = child_run(tmp_path / "d", "--seed", "1")
    assert other["samples"] != first["samples"]
    assert {c[0] for c in other["cells"]}.isdisjoint({c[0] for c in first["cells"]})
