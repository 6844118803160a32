"""Submitted code runs isolated (bench/harness/submission/sandbox.py): a defense that crashes
(``os._exit``, a segfault through ctypes), hangs, allocates without bound or raises is reported
as exactly that, on one line, within its limits, and the parent process, its runner and its
result store go on untouched. The submitted files are imported in the child only, never here."""

from __future__ import annotations

import sqlite3
import sys
import textwrap
import time

import pytest
import torch

from bench.core.store import ResultStore
from bench.harness.submission.sandbox import (
    SandboxError,
    SandboxResult,
    parse_size,
    probe_defense,
    run_isolated,
    submit_isolated,
)

HOSTILE = '''
import ctypes
import gc
import json
import os
import subprocess
import sys
import time

import torch
from torch import nn


def ok(x):
    return {"double": torch.as_tensor(x) * 2, "meta": ["plain", 1, 2.5, None, True]}


def raises():
    raise ValueError("the defense is broken: expected 3 channels, got 4\\nsecond line")


def exits():
    os._exit(7)


def calls_sys_exit():
    sys.exit(5)


def segfault():
    print("about to dereference NULL", flush=True)
    ctypes.string_at(0)


def hangs(marker):
    # a subprocess of its own: it must die with the sandbox
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(marker, "w") as f:
        f.write(str(child.pid))
    while True:
        time.sleep(0.05)


def hoards_bytes():
    hoard = []
    while True:
        hoard.append(bytearray(32 << 20))


def hoards_tensors():
    hoard = []
    while True:
        hoard.append(torch.ones(32 << 20, dtype=torch.uint8))


def spins():
    while True:
        pass


def huge_tensor():
    return torch.empty(1 << 42, dtype=torch.uint8)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would run code in whoever unpickles it
        return (open, (self.marker, "w"))


def returns_object(marker):
    return Payload(marker)


def forges_result(marker):
    """Bypass the child's own checks: write a crafted pickle straight into the result pipe."""
    import io
    import pickle
    from multiprocessing.connection import Connection

    conn = next(o for o in gc.get_objects() if isinstance(o, Connection) and o.writable)
    conn.send_bytes(json.dumps({"status": "ok"}).encode())
    conn.send_bytes(pickle.dumps(Payload(marker)))
    os._exit(0)


def dies_in_a_transaction(db):
    con = sqlite3_connect(db)
    con.execute("BEGIN IMMEDIATE")
    con.execute("INSERT INTO samples (cell_key, idx, sample_id, label, attacked, clean_correct, "
                "robust) VALUES ('k', 99, 'partial', 0, 0, 1, 1)")
    ctypes.string_at(0)


def hangs_in_a_transaction(db):
    con = sqlite3_connect(db)
    con.execute("BEGIN IMMEDIATE")
    con.execute("INSERT INTO samples (cell_key, idx, sample_id, label, attacked, clean_correct, "
                "robust) VALUES ('k', 98, 'partial2', 0, 0, 1, 1)")
    while True:
        time.sleep(0.05)


def sqlite3_connect(db):
    import sqlite3

    return sqlite3.connect(db, isolation_level=None, timeout=1)


# defenses (module:Class submissions) --------------------------------------------------------
class Good(nn.Module):
    num_classes = 10

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3 * 16 * 16, 10)

    def forward(self, x):
        return self.lin(x.flatten(1))


class Crashes(Good):
    def forward(self, x):
        os._exit(3)


class Segfaults(Good):
    def forward(self, x):
        ctypes.string_at(0)


class Hangs(Good):
    def forward(self, x):
        while True:
            time.sleep(0.05)


class Hoards(Good):
    def forward(self, x):
        hoard = []
        while True:
            hoard.append(torch.ones(32 << 20, dtype=torch.uint8))


class Raises(Good):
    def forward(self, x):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x768 and 3x10)")
'''

LIMITS = {"timeout": 60, "memory_limit": "512MiB", "threads": 1}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    path = tmp_path_factory.mktemp("submission") / "hostile_defense.py"
    path.write_text(textwrap.dedent(HOSTILE))
    return path


def run(hostile, name, *args, **kw):
    return run_isolated(f"{hostile}:{name}", *args, **{**LIMITS, **kw})


def one_line(res: SandboxResult) -> str:
    assert res.message and "\n" not in res.message and "\r" not in res.message, res.message
    return res.message


def test_a_result_comes_back(hostile):
    res = run(hostile, "ok", 21)
    assert res.ok and res.status == "ok", res.message
    assert torch.equal(res.value["double"], torch.tensor(42))
    assert res.value["meta"] == ["plain", 1, 2.5, None, True]
    assert res.unwrap() is res.value
    assert not any("hostile_defense" in m for m in sys.modules)  # imported in the child only


def test_an_exception_is_reported_with_its_message(hostile):
    res = run(hostile, "raises")
    assert res.status == "exception" and res.error_type == "ValueError"
    assert "expected 3 channels, got 4" in one_line(res) and "second line" not in res.message
    assert "Traceback" in res.traceback and "def raises" not in res.message
    with pytest.raises(SandboxError, match="raised ValueError") as info:
        res.unwrap()
    assert info.value.result is res


@pytest.mark.parametrize("name,code", [("exits", 7), ("calls_sys_exit", 5)])
def test_an_exit_is_a_crash_with_its_status(hostile, name, code):
    res = run(hostile, name)
    if name == "calls_sys_exit":  # SystemExit is an exception the child catches and reports
        assert res.status == "exception" and res.error_type == "SystemExit", res.message
    else:
        assert res.status == "crash" and res.exit_code == code and res.signal is None
        assert f"exited with status {code}" in one_line(res)


def test_a_segfault_is_a_crash_with_the_signal_and_the_place(hostile):
    res = run(hostile, "segfault")
    assert res.status == "crash" and res.signal == "SIGSEGV" and res.exit_code == -11
    msg = one_line(res)
    assert "segmentation fault" in msg
    assert "string_at" in msg or "segfault" in msg  # faulthandler's innermost frame
    assert "about to dereference NULL" in res.output_tail


def test_a_hang_is_killed_at_the_time_limit_with_its_subprocesses(hostile, tmp_path):
    import os

    marker = tmp_path / "grandchild.pid"
    t0 = time.monotonic()
    res = run(hostile, "hangs", str(marker), timeout=3)
    took = time.monotonic() - t0
    assert res.status == "timeout" and res.signal == "SIGKILL", res.message
    assert "did not finish within 3 s" in one_line(res)
    assert took < 30
    pid = int(marker.read_text())
    for _ in range(100):  # the grandchild was in the sandbox's process group
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        with open(f"/proc/{pid}/stat") as f:  # a zombie awaiting its (killed) parent's reaper
            assert f.read().split()[2] == "Z", f"grandchild {pid} survived the timeout"


@pytest.mark.parametrize("name", ["hoards_bytes", "hoards_tensors", "huge_tensor"])
def test_unbounded_allocation_hits_the_memory_limit(hostile, name):
    res = run(hostile, name, memory_limit="256MiB")
    assert res.status == "memory", (res.status, res.message)
    msg = one_line(res)
    assert "ran out of memory (limit 256 MiB" in msg and "raise the memory limit" in msg


def test_the_cpu_time_limit(hostile, tmp_path):
    res = run(hostile, "spins", cpu_time_limit=1, timeout=60)
    assert res.status == "crash" and res.signal == "SIGXCPU", res.message
    assert "CPU-time limit" in one_line(res)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_an_arbitrary_object_is_not_unpickled_here(hostile, tmp_path):
    marker = tmp_path / "pwned"
    res = run(hostile, "returns_object", str(marker))
    assert res.status == "bad_result" and "cannot be passed back safely" in one_line(res)
    assert not marker.exists()
    # a child that forges its report (writes its own pickle into the pipe) is refused too
    res = run(hostile, "forges_result", str(marker))
    assert res.status == "bad_result", res.message
    assert "refused" in one_line(res)
    assert not marker.exists()


def _store_with_one_batch(path):
    store = ResultStore(path)
    store.begin_cell("k", dataset="d", defense="x", attack="a", threat="linf", eps=0.1,
                     n_batches=2, spec={}, provenance={})
    rows = [{"idx": i, "sample_id": f"s{i}", "label": 0, "attacked": 1, "clean_correct": 1,
             "robust": 1} for i in range(3)]
    assert store.add_batch("k", 0, rows, adv_path=None, adv_sha256=None, wall_time=0.0)
    return store


def test_the_parent_store_survives_a_child_dying_or_hanging_inside_a_transaction(hostile,
                                                                                  tmp_path):
    db = tmp_path / "results.sqlite"
    store = _store_with_one_batch(db)
    before = store.samples("k")
    res = run(hostile, "dies_in_a_transaction", str(db))
    assert res.status == "crash" and res.signal == "SIGSEGV", res.message
    res = run(hostile, "hangs_in_a_transaction", str(db), timeout=2)
    assert res.status == "timeout", res.message
    assert store.samples("k") == before  # no partial row from either child
    rows = [{"idx": 3, "sample_id": "s3", "label": 1, "attacked": 1, "clean_correct": 0,
             "robust": 0}]
    t0 = time.monotonic()
    assert store.add_batch("k", 1, rows, adv_path=None, adv_sha256=None, wall_time=0.0)
    assert time.monotonic() - t0 < 5  # the killed children's write locks are gone
    assert len(store.samples("k")) == 4
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()


# module:Class defense evaluation -------------------------------------------------------------
PROBE = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def probe(hostile, cls, **kw):
    return probe_defense(f"{hostile}:{cls}", PROBE, dataset="test_tiny",
                         **{**LIMITS, "memory_limit": "1GiB", **kw})


def test_a_good_defense_is_evaluated_in_the_child(hostile):
    res = probe(hostile, "Good")
    assert res.ok, res.message + "\n" + res.traceback
    assert res.value["logits"].shape == (4, 10)
    assert res.value["registry_name"].startswith("good@")
    assert not any("hostile_defense" in m for m in sys.modules)


# Only the hanging defense gets a short limit: the others must reach their own failure, and a
# child's start (importing torch) on a loaded 2-core CI machine can itself take a few seconds.
@pytest.mark.parametrize("cls,status,words,timeout", [
    ("Crashes", "crash", "exited with status 3", 60),
    ("Segfaults", "crash", "segmentation fault", 60),
    ("Hangs", "timeout", "did not finish within 3 s", 3),
    ("Hoards", "memory", "ran out of memory", 60),
    ("Raises", "exception", "mat1 and mat2 shapes cannot be multiplied", 60),
])
def test_a_broken_defense_is_reported_and_the_parent_goes_on(hostile, tmp_path, cls, status,
                                                             words, timeout):
    store = _store_with_one_batch(tmp_path / "results.sqlite")
    before = store.counts()
    res = probe(hostile, cls, timeout=timeout)
    assert res.status == status, (res.status, res.message, res.traceback[-2000:])
    msg = one_line(res)
    assert words in msg and f"{hostile}:{cls}" in msg
    with pytest.raises(SandboxError):
        res.unwrap()
    assert store.counts() == before  # the parent's store and connection are fine
    store.add_batch("k", 1, [{"idx": 5, "sample_id": "s5", "label": 0, "attacked": 1,
                              "clean_correct": 1, "robust": 1}], adv_path=None, adv_sha256=None,
                    wall_time=0.0)
    assert store.counts()["samples"] == before["samples"] + 1


def test_a_crashing_submission_through_submit_isolated(hostile, tmp_path):
    """The whole ``submit`` in a child: the crash ends it with one line; nothing else runs."""
    from bench.harness.submission.suites import Metadata, SubmitOptions

    opts = SubmitOptions(dataset="test_tiny", n=20, suite="test", fit_preset="tiny",
                         device="cpu", batch_size=10, run_dir=str(tmp_path / "run"),
                         progress=False)
    res = submit_isolated(f"{hostile}:Segfaults", Metadata(name="segfaulting"), opts,
                          timeout=120, memory_limit="2GiB", threads=1)
    assert res.status == "crash" and res.signal == "SIGSEGV", res.message
    assert "segmentation fault" in one_line(res)


def test_limits_are_checked():
    assert parse_size("512MiB") == 512 << 20 and parse_size("2G") == 2 << 30
    assert parse_size(1024) == 1024 and parse_size(None) is None
    for bad in ("lots", "-1G", True, 0):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ValueError):
        run_isolated(print, timeout=0)
    with pytest.raises(ValueError):
        run_isolated(print, start_method="fork")
