"""Crash safety of the result store (docs/reliability.md).

* a smoke matrix killed with SIGKILL at random points, several times in a row (after a random
  number of committed batches, ROBUSTMATRIX_KILL_AFTER_BATCHES, and by a timer at a random
  moment, which can land inside an attack, a file write or a SQLite commit), then resumed,
  ends with a store equal, row for row, to an uninterrupted run's: no duplicates, nothing lost
  (every row seen after one kill is still there, unchanged, after the next), integrity ok;
* two runs on the same store at once COOPERATE: each batch is stored once, both finish, the
  store equals the reference;
* a full disk or a read-only run directory ends the run with ONE line
  (``robustmatrix: error: ...``, exit 2) and loses nothing already stored; the same command
  resumes once space is back.

The runs are real processes: children of
:func:`bench.harness.submission.sandbox.run_isolated`'s forkserver (torch imported once), each
running ``bench.cli.main`` with one torch thread.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import shutil
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.core.store import ResultStore
from bench.harness.submission.sandbox import run_isolated

ARGS = ["run", "smoke", "--no-progress", "--batch-size", "5"]  # 20 images: 4 batches per cell
KILL_ENV = "ROBUSTMATRIX_KILL_AFTER_BATCHES"
SEED = 20240607
FIGURES: dict[str, int] = {"kills": 0, "rows_lost": 0, "resumes": 0}


def cli_child(run_dir: Path, extra: list[str] | None = None, *, kill_after: int | None = None,
              timeout: float = 300):
    """``robustmatrix run smoke`` in a separate process (sandbox child, one torch thread)."""
    env = {KILL_ENV: str(kill_after) if kill_after else None,
           "ROBUSTMATRIX_CACHE": os.environ["ROBUSTMATRIX_CACHE"]}
    return run_isolated("bench.cli:main", [*ARGS, "--run-dir", str(run_dir), *(extra or [])],
                        timeout=timeout, memory_limit=None, threads=1, env=env,
                        label="robustmatrix run")


def snapshot(db: Path) -> dict[str, dict]:
    """Every row that matters, keyed: samples by (cell, sample id), batches by (cell, batch)
    with the sha256 of their stored adversarials, finished cells by key."""
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        samples = {(r["cell_key"], r["sample_id"]): tuple(r) for r in con.execute(
            "SELECT * FROM samples")}
        batches = {(r["cell_key"], r["batch"]): r["adv_sha256"] for r in con.execute(
            "SELECT cell_key, batch, adv_sha256 FROM batches")}
        cells = {r["key"]: (r["status"], r["n_batches"], r["adv_sha256"], r["forward_passes"],
                            r["backward_passes"]) for r in con.execute(
            "SELECT * FROM cells WHERE status='done'")}
        return {"samples": samples, "batches": batches, "cells": cells}
    finally:
        con.close()


def check_store(db: Path) -> None:
    """Integrity ok, no duplicate sample or batch, every batch complete (its rows all there)."""
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT COUNT(*) FROM (SELECT cell_key, sample_id, COUNT(*) c FROM "
                           "samples GROUP BY 1, 2 HAVING c > 1)").fetchone()[0] == 0
        assert con.execute("SELECT COUNT(*) FROM (SELECT cell_key, batch, COUNT(*) c FROM "
                           "batches GROUP BY 1, 2 HAVING c > 1)").fetchone()[0] == 0
        per_cell = dict(con.execute("SELECT cell_key, COUNT(*) FROM samples GROUP BY 1"))
        batches = dict(con.execute("SELECT cell_key, COUNT(*) FROM batches GROUP BY 1"))
        for key, n in per_cell.items():  # smoke: 5 samples per batch, never a partial batch
            assert n == 5 * batches[key], (key, n, batches[key])
    finally:
        con.close()


def n_batches(db: Path) -> int:
    if not db.exists():
        return 0
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT COUNT(*) FROM batches").fetchone()[0]
    except sqlite3.OperationalError:  # killed before the schema was written
        return 0
    finally:
        con.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, in the same kind of process as the killed ones."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    res = cli_child(run_dir)
    assert res.ok and res.value == 0, res.message + "\n" + res.output_tail
    db = run_dir / "results.sqlite"
    check_store(db)
    snap = snapshot(db)
    assert len(snap["cells"]) >= 4 and len(snap["batches"]) >= 16
    print(f"\nreference run: {res.wall_time:.1f} s in its process")
    return {"db": db, "run_dir": run_dir, "snap": snap, "wall": res.wall_time,
            "batches": len(snap["batches"])}


def assert_subset_of_reference(snap: dict, ref: dict) -> None:
    for table in ("samples", "batches", "cells"):
        for k, v in snap[table].items():
            assert k in ref[table], (table, k)
            assert v == ref[table][k], (table, k, v, ref[table][k])


def kill_episode(run_dir: Path, reference: dict, rng: random.Random, rounds: int = 4
                 ) -> list[str]:
    """Kill a run of the matrix in ``run_dir`` up to ``rounds`` times in a row, checking the
    store after each kill, then resume it; returns what each kill was."""
    db = run_dir / "results.sqlite"
    total = reference["batches"]
    before: dict = {"samples": {}, "batches": {}, "cells": {}}
    log: list[str] = []
    for round_ in range(rounds):
        done = n_batches(db)
        if done >= total:
            break
        if round_ % 2 == 0 and total - done > 1:  # after a random number of committed batches
            k = rng.randint(1, min(3, total - done - 1))
            res = cli_child(run_dir, kill_after=k)
            assert res.status == "crash" and res.signal == "SIGKILL", res.message
            assert n_batches(db) == done + k
            log.append(f"after {k} batches")
        else:  # by a timer, at a random moment (setup, attack, file write or commit)
            remaining = reference["wall"] * (total - done) / total
            delay = rng.uniform(0.05, max(0.3, 0.9 * remaining))
            res = cli_child(run_dir, timeout=delay)
            assert res.status in ("timeout", "ok"), res.message
            if res.status == "timeout":
                log.append(f"at {delay:.2f} s")
        if not db.exists():
            continue
        check_store(db)
        snap = snapshot(db)
        assert_subset_of_reference(snap, reference["snap"])
        lost = [key for key in before["samples"] if key not in snap["samples"]]
        FIGURES["rows_lost"] += len(lost)
        assert not lost, f"{len(lost)} stored rows lost by a kill"
        before = snap
    res = cli_child(run_dir)  # resume
    assert res.ok and res.value == 0, res.message + "\n" + res.output_tail
    check_store(db)
    assert snapshot(db) == reference["snap"]
    return log


def test_repeated_random_kills_then_resume(reference, tmp_path):
    rng = random.Random(SEED)
    log: list[str] = []
    for episode in range(3):
        log += kill_episode(tmp_path / f"killed{episode}", reference, rng)
    assert len(log) >= 6, log
    FIGURES["kills"] += len(log)
    FIGURES["resumes"] += 3
    print(f"\ncrash-safety: survived {len(log)} SIGKILLs in 3 runs ({', '.join(log)}); 0 rows "
          f"lost; every store equal to the reference ({len(reference['snap']['samples'])} rows)")


def test_two_runs_on_one_store_cooperate(reference, tmp_path):
    """Both finish; SQLite serialises the writers (BEGIN IMMEDIATE, 30 s busy timeout) and a
    batch already stored is not stored again (add_batch returns False): each batch once."""
    run_dir = tmp_path / "shared"
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: cli_child(run_dir), range(2)))
    for res in results:
        assert res.ok and res.value == 0, res.message + "\n" + res.output_tail
    db = run_dir / "results.sqlite"
    check_store(db)
    assert snapshot(db) == reference["snap"]
    assert n_batches(db) == reference["batches"]


def test_kill_during_a_concurrent_run_loses_nothing(reference, tmp_path):
    """One of two concurrent runs is SIGKILLed mid-way: the other finishes the matrix."""
    run_dir = tmp_path / "shared_kill"
    with ThreadPoolExecutor(2) as pool:
        killed = pool.submit(cli_child, run_dir, kill_after=3)
        survivor = pool.submit(cli_child, run_dir)
        k, s = killed.result(), survivor.result()
    assert k.status in ("crash", "ok") and s.ok and s.value == 0, (k.message, s.message)
    db = run_dir / "results.sqlite"
    check_store(db)
    assert snapshot(db) == reference["snap"]


# full disk, read-only run directory ----------------------------------------------------------
def _one_line_error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines()
           if not ln.startswith("robustmatrix: running") and "fitting" not in ln]
    assert err and err[-1].startswith("robustmatrix: error: "), err
    assert "Traceback" not in "\n".join(err), err
    errors = [ln for ln in err if ln.startswith("robustmatrix: error")]
    assert len(errors) == 1, err
    return err[-1]


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _limit_store(monkeypatch, pragma: str) -> None:
    """Open every writable store with ``pragma`` applied (SQLite's own failure modes)."""
    orig = ResultStore.__init__

    def init(self, path, *, readonly=False):
        orig(self, path, readonly=readonly)
        if not readonly:
            if "max_page_count" in pragma:
                pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
                self.conn.execute(f"PRAGMA max_page_count={pages}")
            else:
                self.conn.execute(pragma)

    monkeypatch.setattr(ResultStore, "__init__", init)


@pytest.mark.parametrize("pragma,expected", [
    ("PRAGMA max_page_count", "full"),          # SQLITE_FULL: 'database or disk is full'
    ("PRAGMA query_only=1", "readonly"),        # 'attempt to write a readonly database'
], ids=["disk-full", "read-only"])
def test_store_full_or_read_only_one_line_nothing_lost(reference, tmp_path, monkeypatch, capsys,
                                                       one_thread, pragma, expected):
    run_dir = tmp_path / "run"
    shutil.copytree(reference["run_dir"], run_dir)
    db = run_dir / "results.sqlite"
    before = snapshot(db)
    _limit_store(monkeypatch, pragma)
    code = main([*ARGS, "--run-dir", str(run_dir), "--threat", "linf=4/255"])  # new cells
    line = _one_line_error(capsys)
    assert code == 2
    assert expected in line.replace(" ", "").lower() or "disk" in line, line
    check_store(db)
    assert snapshot(db) == before
    monkeypatch.undo()
    assert main([*ARGS, "--run-dir", str(run_dir), "--threat", "linf=4/255"]) == 0
    after = snapshot(db)
    assert all(after["samples"][k] == v for k, v in before["samples"].items())
    assert len(after["cells"]) > len(before["cells"])


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(folder: Path) -> Path:
    """Fill the file system holding ``folder`` to the last byte."""
    filler = folder / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 512)
    return filler


def test_real_full_disk_and_read_only_file_system(reference, tmp_path, capsys, one_thread):
    """The same on a real (tiny) tmpfs: filled to the last byte, then remounted read-only."""
    mnt = tmp_path / "mnt"
    with tmpfs(mnt, "16m"):
        run_dir = mnt / "run"
        shutil.copytree(reference["run_dir"], run_dir)
        db = run_dir / "results.sqlite"
        before = snapshot(db)
        # a full disk
        filler = _fill(mnt)
        code = main([*ARGS, "--run-dir", str(run_dir), "--threat", "linf=4/255"])
        line = _one_line_error(capsys)
        assert code == 2 and ("full" in line or "space" in line), line
        filler.unlink()
        check_store(db)
        assert snapshot(db) == before
        # a read-only file system: a read-only bind mount of the same tmpfs
        ro = tmp_path / "ro"
        ro.mkdir()
        subprocess.run(["mount", "--bind", str(mnt), str(ro)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
            code = main([*ARGS, "--run-dir", str(ro / "run"), "--threat", "linf=4/255"])
            line = _one_line_error(capsys)
            assert code == 2 and ("read-only" in line or "writable" in line), line
        finally:
            gc.collect()  # the failed runner's store connection
            subprocess.run(["umount", "-l", str(ro)], capture_output=True)
        check_store(db)
        assert snapshot(db) == before
        # space is back: the same command resumes
        assert main([*ARGS, "--run-dir", str(run_dir), "--threat", "linf=4/255"]) == 0
        capsys.readouterr()
        after = snapshot(db)
        assert all(after["samples"][k] == v for k, v in before["samples"].items())
        check_store(db)


@pytest.mark.slow
def test_cli_subprocess_is_killed_by_a_timer_and_resumes(reference, tmp_path):
    """One plain ``python -m bench`` process (no sandbox) killed with SIGKILL by the test at
    a random moment after its first committed batch, then resumed."""
    import time

    run_dir = tmp_path / "plain"
    db = run_dir / "results.sqlite"
    cmd = [sys.executable, "-m", "bench", *ARGS, "--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(KILL_ENV, None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while n_batches(db) < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(random.Random(SEED).uniform(0, 0.5))
        proc.kill()
    finally:
        proc.wait(timeout=60)
    killed = proc.returncode == -9
    check_store(db)
    assert_subset_of_reference(snapshot(db), reference["snap"])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    check_store(db)
    assert snapshot(db) == reference["snap"]
    FIGURES["kills"] += int(killed)
