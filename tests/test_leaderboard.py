"""Leaderboard arithmetic: Wilson intervals, the per-sample worst case, tied ranks."""

import math

import pandas as pd
import pytest

from bench.core.store import ResultStore
from leaderboard.formats import to_markdown
from leaderboard.table import build_records, build_tables, rank, wilson_interval


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(50, 100)
    assert math.isclose(lo, 0.4038, abs_tol=1e-3) and math.isclose(hi, 0.5962, abs_tol=1e-3)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and math.isclose(hi, 0.1611, abs_tol=1e-3)
    assert wilson_interval(20, 20)[1] == 1.0


def _fill(store, attack, robust_by_sample, key):
    n = len(robust_by_sample)
    store.begin_cell(key, dataset="d", defense="D", attack=attack,
                     threat="none" if attack == "clean" else "linf",
                     eps=0.0 if attack == "clean" else 0.03, n_batches=1, spec={}, provenance={})
    rows = [{"idx": i, "sample_id": f"s{i}", "label": 0, "attacked": int(attack != "clean"),
             "clean_correct": 1, "clean_flagged": 0, "adv_correct": r, "adv_flagged": 0,
             "robust": r} for i, r in enumerate(robust_by_sample)]
    store.add_batch(key, 0, rows, adv_path=None, adv_sha256=None, wall_time=0.0)
    store.finish_cell(key, flags=[], metrics={}, provenance={})
    return n


def test_worst_case_is_a_per_sample_and(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    _fill(store, "clean", [1, 1, 1, 1], "k0")
    _fill(store, "a1", [0, 1, 1, 1], "k1")  # breaks sample 0
    _fill(store, "a2", [1, 0, 1, 1], "k2")  # breaks sample 1
    (rec,) = build_records(store)
    assert rec["attacks"]["a1"]["accuracy"] == 0.75 and rec["attacks"]["a2"]["accuracy"] == 0.75
    # a minimum of per-attack averages would say 75%; the per-sample AND says 50%
    assert rec["worst_case"]["accuracy"] == 0.5
    md = to_markdown(build_tables(store))
    assert "50.0" in md and "Worst case %" in md


def test_overlapping_intervals_share_a_rank():
    def r(lo, hi):
        return {"worst_case": {"ci_low": lo, "ci_high": hi}}

    assert rank([r(0.6, 0.8), r(0.5, 0.65), r(0.1, 0.2)]) == [1, "=1", 3]


def test_ties_do_not_chain_past_the_group_leader():
    """Each row overlaps the one above, but the last two do not overlap the leader: the old
    chained rule ranked an undefended 0 [0, 7] '=1' with PGD-AT's 38 [26, 52]."""
    def r(lo, hi):
        return {"worst_case": {"ci_low": lo, "ci_high": hi}}

    rows = [r(0.26, 0.52), r(0.24, 0.50), r(0.08, 0.29), r(0.04, 0.21), r(0.0, 0.07)]
    assert rank(rows) == [1, "=1", "=1", 4, "=4"]


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (3, 7), (999, 1000)])
def test_wilson_contains_the_estimate(k, n):
    lo, hi = wilson_interval(k, n)
    assert 0 <= lo <= k / n <= hi <= 1


def test_a_reconfigured_cell_supersedes_the_old_one(tmp_path):
    """A run directory run again after an attack's configuration changed holds the old and the
    new cell under the same labels: the leaderboard uses the newest (or exactly the keys a run
    passes), never a mix of both."""
    store = ResultStore(tmp_path / "r.sqlite")
    _fill(store, "clean", [1, 1, 1, 1], "k0")
    _fill(store, "a1", [1, 1, 1, 1], "old")  # e.g. PGD-10
    _fill(store, "a1", [0, 0, 1, 1], "new")  # the same label after steps: 100
    (rec,) = build_records(store)
    assert rec["attacks"]["a1"]["accuracy"] == 0.5 and rec["worst_case"]["accuracy"] == 0.5
    (rec,) = build_records(store, keys=["k0", "old"])  # what a run of the old config shows
    assert rec["attacks"]["a1"]["accuracy"] == 1.0
    assert build_records(store, keys=[]) == []


# --- paired comparison (leaderboard/compare.py) -------------------------------------------

def test_newcombe_paired_interval_matches_the_published_value():
    """Fagerland, Lydersen and Laake's reference implementation (R package contingencytables,
    chapter 8 tests): table [[59, 6], [16, 80]] gives -0.0621 (-0.1186 to -0.0046)."""
    from leaderboard.compare import newcombe_paired_interval

    lo, hi = newcombe_paired_interval(59, 6, 16, 80)
    assert lo == pytest.approx(-0.1186, abs=1e-4) and hi == pytest.approx(-0.0046, abs=1e-4)
    # identical outcomes: the difference is 0 and the interval straddles it
    lo, hi = newcombe_paired_interval(30, 0, 0, 70)
    assert lo < 0 < hi
    # all discordant pairs one way: the interval excludes 0 and stays in [-1, 1]
    lo, hi = newcombe_paired_interval(0, 0, 20, 0)
    assert -1 <= lo < hi < 0


def test_mcnemar_exact_p():
    from leaderboard.compare import mcnemar_exact_p

    assert mcnemar_exact_p(0, 9) == pytest.approx(2 / 2 ** 9)
    assert mcnemar_exact_p(9, 0) == mcnemar_exact_p(0, 9)
    assert mcnemar_exact_p(5, 5) == 1.0 and mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(3, 9) == pytest.approx(2 * sum(math.comb(12, i) for i in range(4))
                                                  / 2 ** 12)


def test_paired_counts_use_the_shared_images_only():
    from leaderboard.compare import CompareError, paired_counts

    a = pd.Series([True, True, False, False, True], index=["s0", "s1", "s2", "s3", "s4"])
    b = pd.Series([True, False, True, False], index=["s0", "s1", "s2", "s3"])
    c = paired_counts(a, b)
    assert (c["n"], c["both"], c["only_a"], c["only_b"], c["neither"]) == (4, 1, 1, 1, 1)
    assert c["difference"] == 0 and c["unshared"] == 1
    with pytest.raises(CompareError, match="share no images"):
        paired_counts(a, pd.Series([True], index=["other"]))
