"""Issue 16: untrusted code and files, tried as a hostile user would. One test (or more) per
numbered case of the issue, through the CLI path a user takes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from bench.cli import main

HOSTILE = Path(__file__).resolve().parent / "hostile" / "defenses.py"
SUBMIT = ["--dataset", "test_tiny", "--n", "8", "--suite", "test", "--fit-preset", "tiny",
          "--device", "cpu", "--no-progress"]


def _last_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


# case 1: submitted code runs in a child with limits ------------------------------------------
@pytest.mark.parametrize("cls, limits, words", [
    ("Sleeps", ["--time-limit", "6"], "did not finish within 6 s"),
    ("Allocates", ["--memory-limit", "512MiB"], "allocate memory"),  # the limit hit, in the child
    ("Exits", [], "exited with status 0"),
])
def test_a_hostile_forward_fails_the_submission_in_one_line(tmp_path, capsys, cls, limits,
                                                            words):
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    code = main(["submit", f"{HOSTILE}:{cls}", *SUBMIT, "--run-dir", str(run_dir), *limits])
    assert code == 2  # never a silent success
    assert time.monotonic() - t0 < 60
    line = _last_line(capsys)
    assert line.startswith("robustmatrix: error: submission ") and words in line, line
    assert not list((run_dir / "entries").glob("*.json")) if (run_dir / "entries").exists() \
        else True


def test_a_forking_defense_is_killed_with_its_children(tmp_path, capsys):
    import tempfile

    marker = Path(tempfile.gettempdir()) / f"robustmatrix-forks-{os.getuid()}.pid"
    marker.unlink(missing_ok=True)
    code = main(["submit", f"{HOSTILE}:Forks", *SUBMIT, "--run-dir", str(tmp_path / "run"),
                 "--time-limit", "8"])
    assert code == 2
    assert "did not finish within 8 s" in _last_line(capsys)
    pid = int(marker.read_text())
    for _ in range(50):  # the killed grandchild is reaped by init shortly after
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the defense's own subprocess {pid} outlived the submission")


def test_a_class_that_raises_in_init_is_one_line(tmp_path, capsys):
    code = main(["submit", f"{HOSTILE}:RaisesInInit", *SUBMIT, "--run-dir", str(tmp_path / "r")])
    assert code == 2
    line = _last_line(capsys)
    assert "broken constructor" in line and line.startswith("robustmatrix: error:")


def test_a_failed_submission_leaves_earlier_entries_and_the_store_intact(tmp_path, capsys):
    from bench.core.store import ResultStore

    run_dir = tmp_path / "run"
    example = Path(__file__).resolve().parents[1] / "examples" / "my_defense.py"
    assert main(["submit", f"{example}:BitDepthCNN", *SUBMIT, "--run-dir", str(run_dir)]) == 0
    entries = sorted((run_dir / "entries").glob("*.json"))
    before = {p.name: p.read_bytes() for p in entries}
    store_before = {c.key: c.status for c in ResultStore(run_dir / "results.sqlite",
                                                          readonly=True).cells()}
    assert main(["submit", f"{HOSTILE}:Exits", *SUBMIT, "--run-dir", str(run_dir)]) == 2
    assert {p.name: p.read_bytes() for p in sorted((run_dir / "entries").glob("*.json"))} \
        == before
    after = {c.key: c.status for c in ResultStore(run_dir / "results.sqlite",
                                                   readonly=True).cells()}
    assert {k: v for k, v in after.items() if k in store_before} == store_before
