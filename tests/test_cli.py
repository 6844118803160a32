"""The command line: bad input gets ONE line naming the problem and the fix, exit status 2,
and nothing already stored is lost."""

import sqlite3
import subprocess
import sys

import pytest

from bench.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    assert main(["run", "smoke", "--run-dir", str(run_dir), "--no-progress"]) == 0
    return run_dir


def count_rows(run_dir):
    con = sqlite3.connect(run_dir / "results.sqlite")
    try:
        return con.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
    finally:
        con.close()


BAD = {
    "unknown defense": (["--defense", "undefnded"], "did you mean 'undefended'"),
    "unknown attack": (["--attack", "pgdd"], "unknown attack 'pgdd'"),
    "negative epsilon": (["--threat", "linf=-0.1"], "must be a finite number >= 0"),
    "NaN epsilon": (["--threat", "linf=nan"], "must be a finite number >= 0"),
    "linf eps in pixels": (["--threat", "linf=8"], "did you mean 8.0/255"),
    "n = 0": (["--n", "0"], "n: must be between 1"),
    "absurd batch": (["--batch-size", "1e12"], "batch_size: must be between"),
    "unknown threat": (["--threat", "l7=1"], "unknown threat 'l7'"),
    "missing data root": (["--dataset", "cifar10", "--data-root", "/nonexistent/data"], ""),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_one_line_error_and_nothing_lost(stored_run, case, capsys):
    args, expected = BAD[case]
    before = count_rows(stored_run)
    code = main(["run", "smoke", "--run-dir", str(stored_run), "--no-progress", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("robustmatrix: error: ") and expected in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert count_rows(stored_run) == before


def test_malformed_config_files(tmp_path, capsys):
    cases = {
        "broken.yaml": "datasets: [cifar10\nattacks: pgd",
        "unknown_key.yaml": "datasetz: [test_tiny]\ndefenses: [test_undefended]\nattacks: [pgd]",
        "list.yaml": "- just\n- a list",
        "no_defenses.yaml": "datasets: [test_tiny]\nattacks: [pgd]",
    }
    expect = {"broken.yaml": "not valid YAML", "unknown_key.yaml": "did you mean 'datasets'",
              "list.yaml": "unknown key", "no_defenses.yaml": "'defenses' must be a non-empty list"}
    for name, text in cases.items():
        p = tmp_path / name
        p.write_text(text)
        assert main(["run", str(p), "--run-dir", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expect[name] in err[0], (name, err)
    assert main(["run", "no_such_preset"]) == 2
    assert "use a preset" in capsys.readouterr().err


def test_list_and_help(capsys):
    assert main(["list", "defenses"]) == 0
    assert "undefended" in capsys.readouterr().out
    assert main(["list", "attacks", "--tests"]) == 0
    out = capsys.readouterr().out
    assert "pgd" in out and "test_pgd" in out
    r = run_cli("--help")
    assert r.returncode == 0 and "robustmatrix run" in r.stdout


def test_leaderboard_command_writes_formats(stored_run, capsys):
    assert main(["leaderboard", "--run-dir", str(stored_run)]) == 0
    out = capsys.readouterr().out
    assert "test_undefended" in out and "Worst case %" in out
    lb = stored_run / "leaderboard"
    assert (lb / "leaderboard.md").exists() and (lb / "leaderboard.json").exists()
    assert list(lb.glob("*.csv"))


def test_leaderboard_of_missing_run_is_one_line(tmp_path, capsys):
    assert main(["leaderboard", "--run-dir", str(tmp_path / "nothing")]) == 2
    assert "no result store" in capsys.readouterr().err
