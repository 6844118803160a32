"""The command line: bad input gets ONE line naming the problem and the fix, exit status 2,
and nothing already stored is lost."""

import sqlite3
import subprocess
import sys
from pathlib import Path

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
              "list.yaml": "got a list", "no_defenses.yaml": "'defenses' must be a non-empty list"}
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


@pytest.mark.parametrize("name,keys", [
    ("test_semantic_ae", ("semantic", "plain", "decoded_semantic_vs_plain", "figures")),
    ("test_aae_detector", ("gaussian_noise", "pgd_on_classifier", "prior_distance_clean_codes",
                           "figures")),
    ("test_srd", ("purified_vs_input", "classifier_accuracy_purified", "clusters",
                  "selection_accuracy")),
])
def test_fit_report_writes_metrics_and_figures(name, keys, tmp_path, capsys):
    """`robustmatrix fit DEFENSE --report`: the defense's measured report (and, for the semantic
    AE, its plain twin fitted alongside) as report.json plus the t-SNE figures."""
    import json

    out = tmp_path / name
    assert main(["fit", name, "--dataset", "test_tiny", "--preset", "tiny", "--device", "cpu",
                 "--report", "--report-n", "60", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    for k in keys:
        assert k in rep, k
    for f in rep.get("figures", []):
        assert Path(f).stat().st_size > 1000
    if name == "test_semantic_ae":
        assert 0 <= rep["plain"]["linear_probe_accuracy"] <= 1
        assert (out / "tsne_latents.png").exists()
        wl = rep["wrong_label_attack"]
        assert wl["image"]["linf"] <= 8 / 255 + 1e-6 and 0 <= wl["latent"]["wrong_nearest_wrong"]
        assert set(wl["accuracy_on_x_adv"]) == {"semantic_ae", "bare_classifier", "plain_ae"}
        assert (out / "wrong_label_grid.png").exists() and (out / "tsne_wrong_label.png").exists()
    if name == "test_aae_detector":
        assert set(rep["pgd_on_classifier"]["per_score"]) == {"recon", "prior", "divergence"}
        for k in ("gaussian_noise", "pgd_on_classifier"):
            assert 0 <= rep[k]["auroc"] <= 1 and rep[k]["n_clean"] == 60
    if name == "test_srd":
        assert rep["purified_vs_input"]["in_unit_box"] is True
        assert abs(sum(rep["clusters"]["share_chosen"]) - 1) < 1e-5
        sel = rep["selection_accuracy"]
        assert sel["n"] == 60 and 0 <= sel["pgd_on_classifier"] <= 1 and 0 <= sel["clean"] <= 1
    # a second call reuses the artifact and says so
    capsys.readouterr()
    assert main(["fit", name, "--dataset", "test_tiny", "--preset", "tiny", "--device",
                 "cpu"]) == 0
    assert "reused cached artifact" in capsys.readouterr().err


@pytest.fixture(scope="module")
def two_row_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli2") / "run"
    assert main(["run", "smoke", "--defense", "test_undefended", "--defense", "test_jpeg",
                 "--run-dir", str(run_dir), "--no-progress"]) == 0
    return run_dir


def test_leaderboard_compare_is_paired_on_the_rows_worst_cases(two_row_run, capsys):
    """`robustmatrix leaderboard --compare A B`: the 2x2 counts add up to the images, A's and
    B's worst cases are the leaderboard's, and the difference is only-A minus only-B."""
    import json

    out = two_row_run / "lb"
    assert main(["leaderboard", "--run-dir", str(two_row_run), "--out", str(out),
                 "--compare", "test_jpeg", "test_undefended"]) == 0
    text = (out / "compare.md").read_text()
    assert "A = test_jpeg, B = test_undefended" in text and "McNemar p" in text
    board = json.loads((out / "leaderboard.json").read_text())
    from bench.core.store import ResultStore
    from leaderboard.compare import compare_records

    recs = compare_records(ResultStore(two_row_run / "results.sqlite", readonly=True),
                           "test_jpeg", "test_undefended")
    assert len(recs) == 2  # linf and l2
    worst = {(r["threat"], r["defense"]): r["worst_case"]["accuracy"] for r in board}
    for r in recs:
        assert r["both"] + r["only_a"] + r["only_b"] + r["neither"] == r["n"] == 20
        assert r["worst_a"] == pytest.approx(worst[(r["threat"], "test_jpeg")])
        assert r["worst_b"] == pytest.approx(worst[(r["threat"], "test_undefended")])
        assert r["difference"] == pytest.approx((r["only_a"] - r["only_b"]) / r["n"])
        assert r["ci_low"] <= r["difference"] <= r["ci_high"]
        assert f"{100 * r['difference']:+.1f}" in text


def test_leaderboard_compare_unknown_row_is_one_line(two_row_run, tmp_path, capsys):
    out = tmp_path / "lb"
    assert main(["leaderboard", "--run-dir", str(two_row_run), "--out", str(out),
                 "--compare", "jpeg", "test_undefended"]) == 2
    err = capsys.readouterr().err
    assert "no row named 'jpeg'" in err and "'test_jpeg'" in err
    assert not out.exists()  # checked before anything was written
