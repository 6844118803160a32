"""The automatic flags (EVALUATION.md "Automatic checks"): per defense, per cell, across cells,
stored with the cells and shown in the leaderboard; an honest model gets none."""

import pytest
import torch
from torch import nn

from bench.core.config import config_from_dict
from bench.core.store import ResultStore
from bench.harness import flags as flagmod
from bench.harness.runner import MatrixRunner
from leaderboard.table import build_records, build_tables


@pytest.fixture(scope="module")
def tiny():
    from bench.data import load_eval

    data = load_eval("test_tiny", 20, seed=0)
    return data.images, data.labels


def _defense(name):
    from bench.artifacts import prepare_defense

    return prepare_defense(name, {}, dataset="test_tiny", preset="tiny", log=lambda m: None)[0]


def codes(flags):
    return {f["code"] for f in flags}


# per defense ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,expected", [
    ("test_undefended", set()),
    ("test_random_noise", {"randomness"}),
    ("test_softmax", {"probability_outputs"}),
    ("test_quantized", {"zero_gradients"}),
])
def test_defense_checks(tiny, name, expected):
    x, y = tiny
    found = flagmod.defense_checks(_defense(name), x, y)
    assert codes(found) == expected
    for f in found:  # every flag says what was seen and what to try
        assert f["seen"] and f["try"] and f["title"]


def test_random_flag_reports_declaration(tiny):
    x, y = tiny
    (f,) = flagmod.defense_checks(_defense("test_random_noise"), x, y)
    assert f["declared"] is True


class _Constant(nn.Module):
    """Always class 3, whatever the input (a perfectly 'robust' model: the attack must fail)."""

    def forward(self, x):
        out = torch.zeros(len(x), 10, device=x.device) + 0.0 * x.flatten(1).sum(1, keepdim=True)
        out[:, 3] = 5.0
        return out


def test_large_eps_sanity(tiny):
    x, y = tiny
    assert flagmod.large_eps_check(_defense("test_undefended"), x, y, n=10, steps=10) == []
    y3 = torch.full_like(y, 3)
    found = flagmod.large_eps_check(_Constant(), x, y3, n=10, steps=5)
    assert codes(found) == {"above_chance_large_eps", "unbounded_attack_fails"}


# per cell -------------------------------------------------------------------------------------
def test_attack_checks_from_records():
    assert flagmod.attack_checks({"silent_success": 0, "loss_still_moving": 0}) == []
    found = flagmod.attack_checks({
        "silent_success": 2, "loss_still_moving": 0.3,
        "surrogate_kind": "surrogate", "surrogate_adversarial": 10,
        "surrogate_transfer_failures": 6,
        "autoattack_warnings": [
            "it seems to be a randomized defense! Please use version=\"rand\". See flags_doc.md",
            "there are 3 points with zero gradient! This might lead to unreliable evaluation",
            "Square Attack has decreased the robust accuracy of 1.00%. This might indicate...",
        ]})
    assert codes(found) == {"silent_success", "non_convergence", "surrogate_transfer_failure",
                            "randomness", "zero_gradients", "blackbox_beats_whitebox"}
    # identity BPDA has no surrogate to blame
    assert flagmod.attack_checks({"surrogate_kind": "identity", "surrogate_adversarial": 10,
                                  "surrogate_transfer_failures": 6}) == []


def test_autoattack_warnings_are_extracted_from_the_full_log():
    from attacks.base import AttackResult

    log = ["using custom version including apgd-ce."] * 80 + [
        "it seems that the output is a probability distribution, please be sure that the "
        "logits are used! See flags_doc.md for details."]
    rec = flagmod.result_records(AttackResult(adv=torch.zeros(1), extras={"log": log, "a": 1}))
    assert rec["a"] == 1 and "log" not in rec
    assert len(rec["autoattack_warnings"]) == 1
    assert codes(flagmod.attack_checks(rec)) == {"probability_outputs"}


def test_loss_still_moving():
    flat = torch.ones(20)
    rising = torch.cat([torch.ones(15), torch.linspace(1, 2, 5)])
    assert flagmod.loss_still_moving(flat) == 0.0
    assert flagmod.loss_still_moving(rising) > 0.5


def test_convergence_check_doubles_iterations(tiny):
    from bench.core.config import ComponentSpec
    from bench.harness.planning import create_attack
    from bench.harness.scoring import Scored, attack_batch

    x, y = tiny
    d = _defense("test_undefended")
    spec = ComponentSpec("pgd", {"steps": 1, "rel_stepsize": 0.25, "random_start": False})
    assert flagmod.doubled_spec(spec, "linf").options["steps"] == 2
    assert flagmod.doubled_spec(ComponentSpec("cw", {}), "l2").options["steps"] == 200
    wrapped = flagmod.doubled_spec(ComponentSpec("bpda", {"inner": "test_pgd"}), "linf")
    assert wrapped.options["inner_options"] == {"steps": 6}
    ok = torch.ones(len(y), dtype=torch.bool)
    rows, _, _ = attack_batch(d, create_attack(spec, "linf"), x, y, 8 / 255,
                              clean=Scored(y, ok, ~ok), seed=0, draws=1)
    for i, r in enumerate(rows):
        r["idx"] = i
    found = flagmod.convergence_check(d, spec, "linf", 8 / 255, x, y, rows,
                                      checks={"convergence_subset": 20, "convergence_tol": 0.05})
    assert codes(found) == {"non_convergence"}
    assert found[0]["after"] < found[0]["before"]


# across cells ---------------------------------------------------------------------------------
def _cell(store, key, *, dataset="cifar10", defense="d", attack, threat="linf", eps=8 / 255,
          robust, name=None, config=None, structure=None):
    spec = {"attack": name or attack, "attack_config": config or {}}
    store.begin_cell(key, dataset=dataset, defense=defense, attack=attack, threat=threat,
                     eps=eps, n_batches=1, spec=spec,
                     provenance={"structure": structure or {}})
    rows = [{"idx": i, "sample_id": f"s{i}", "label": 0, "attacked": int(attack != "clean"),
             "clean_correct": 1, "clean_flagged": 0, "adv_correct": int(r), "adv_flagged": 0,
             "robust": int(r), "norm": 0.0, "iterations": 1, "forward_passes": 1,
             "backward_passes": 0, "adv_pred": 0} for i, r in enumerate(robust)]
    store.add_batch(key, 0, rows, adv_path=None, adv_sha256=None, wall_time=0.0)
    store.finish_cell(key, flags=[], metrics={}, provenance={"structure": structure or {}})


def test_matrix_checks_blackbox_eps_sweep_chance_and_detector(tmp_path):
    store = ResultStore(tmp_path / "s.sqlite")
    n = 10
    _cell(store, "clean", attack="clean", threat="none", eps=0.0, robust=[1] * n)
    # white-box breaks 0-4, transfer also breaks 5 and 6
    _cell(store, "wb", attack="pgd", robust=[0] * 5 + [1] * 5)
    _cell(store, "tr", attack="transfer pgd", name="transfer", config={"kind": "transfer"},
          robust=[0] * 7 + [1] * 3)
    # a larger epsilon where PGD does worse (non-monotone) and eps 0.5 above chance
    _cell(store, "wb16", attack="pgd", eps=16 / 255, robust=[0] * 3 + [1] * 7)
    _cell(store, "wb05", attack="pgd", eps=0.5, robust=[0] * 6 + [1] * 4)
    found = flagmod.store_matrix_flags(store)
    assert codes(found["wb"]) == {"blackbox_beats_whitebox"}
    assert "transfer pgd broke 2 of 10" in found["wb"][0]["seen"]
    assert "non_monotone_eps" in codes(found["wb16"])
    assert {"above_chance_large_eps"} <= codes(found["wb05"])
    # stored with scope "matrix" and replaced, not duplicated, on the next run
    flagmod.store_matrix_flags(store)
    stored = store.cell("wb").flags
    assert [f["code"] for f in stored] == ["blackbox_beats_whitebox"]
    assert stored[0]["scope"] == "matrix"
    # and shown in the leaderboard, with what was seen and what to try
    recs = build_records(store)
    rec = next(r for r in recs if abs(r["eps"] - 8 / 255) < 1e-9)
    assert "blackbox_beats_whitebox" in codes(rec["flags"])
    table = next(iter(t for k, t in build_tables(store).items() if "8/255" in k))
    cell = table["Flags"].iloc[0]
    assert "blackbox_beats_whitebox" in cell and "try:" in cell and "broke 2 of 10" in cell


def test_implausible_detector(tmp_path):
    store = ResultStore(tmp_path / "s.sqlite")
    det = {"has_detector": True}
    _cell(store, "c", attack="clean", threat="none", eps=0.0, robust=[1] * 10, structure=det)
    _cell(store, "a", attack="detector-aware pgd", robust=[1] * 9 + [0], structure=det)
    found = flagmod.matrix_checks(store)
    assert codes(found["a"]) == {"implausible_detector"}
    # reference: linear between EVALUATION.md's anchors (94.78 clean, 53.08 at 8/255)
    assert flagmod.reference_accuracy("cifar10", "linf", 4 / 255) == pytest.approx(0.7393)
    assert flagmod.reference_accuracy("cifar10", "linf", 1.0) == pytest.approx(0.5308)
    assert flagmod.reference_accuracy("test_tiny", "linf", 0.1) is None
    # the same numbers without a detector: no flag
    store2 = ResultStore(tmp_path / "s2.sqlite")
    _cell(store2, "c", attack="clean", threat="none", eps=0.0, robust=[1] * 10)
    _cell(store2, "a", attack="pgd", robust=[1] * 9 + [0])
    assert flagmod.matrix_checks(store2) == {}


# end to end: honest model, flagged defenses ----------------------------------------------------
def _run(tmp_path, defenses, attacks, **extra):
    raw = {"name": "flags", "datasets": ["test_tiny"], "n": 20, "defenses": defenses,
           "attacks": attacks, "threat_models": {"linf": ["8/255"]}, "batch_size": 20,
           "fit_preset": "tiny", "device": "cpu", "run_dir": str(tmp_path / "run"), **extra}
    cfg = config_from_dict(raw)
    MatrixRunner(cfg, progress=False, log=lambda m: None).run()
    return ResultStore(tmp_path / "run" / "results.sqlite")


def test_honest_model_gets_no_flag_and_flags_reach_the_table(tmp_path):
    store = _run(tmp_path, ["test_undefended", "test_softmax"], [{"name": "pgd", "steps": 10}])
    by_defense = {}
    for c in store.cells():
        by_defense.setdefault(c.defense, []).extend(c.flags)
    assert by_defense["test_undefended"] == []
    assert "probability_outputs" in codes(by_defense["test_softmax"])
    (table,) = build_tables(store).values()
    flags_col = dict(zip(table["Defense"], table["Flags"]))
    assert flags_col["test_undefended"] == "-"
    assert flags_col["test_softmax"].startswith("probability_outputs")
    assert "try:" in flags_col["test_softmax"]


def test_config_validates_adaptive_and_checks():
    from bench.core.config import ADAPTIVE_KEYS, ConfigError
    from bench.harness.adaptive_policy import ADAPTIVE_DEFAULTS

    assert set(ADAPTIVE_KEYS) == set(ADAPTIVE_DEFAULTS)
    base = {"defenses": ["test_undefended"], "attacks": ["test_pgd"]}
    assert config_from_dict(base).adaptive is True
    assert config_from_dict({**base, "adaptive": {"eot_draws": 4}}).adaptive == {"eot_draws": 4}
    from bench.core.config import DEFAULT_CHECKS

    # the sanity checks are on by default (docs/checklist.md); an explicit key overrides
    assert config_from_dict(base).checks == DEFAULT_CHECKS
    assert config_from_dict({**base, "checks": {"defaults": True}}).checks == DEFAULT_CHECKS
    assert config_from_dict({**base, "checks": {"defaults": False}}).checks == {}
    with pytest.raises(ConfigError, match="binarization_inner"):
        config_from_dict({**base, "checks": {"binarization_inner": 1}})
    assert config_from_dict({**base, "checks": {"defaults": True,
                                                "convergence_subset": 8}}).checks == {
        **DEFAULT_CHECKS, "convergence_subset": 8}
    assert config_from_dict({**base, "checks": {"defaults": False,
                                                "convergence_subset": 8}}).checks == {
        "convergence_subset": 8}
    with pytest.raises(ConfigError, match="checks.defaults"):
        config_from_dict({**base, "checks": {"defaults": "no"}})
    with pytest.raises(ConfigError, match="adaptive: unknown option"):
        config_from_dict({**base, "adaptive": {"eot": 3}})
    with pytest.raises(ConfigError, match="adaptive: expected"):
        config_from_dict({**base, "adaptive": "yes"})
    with pytest.raises(ConfigError, match="checks: unknown option"):
        config_from_dict({**base, "checks": {"convergence": 3}})
