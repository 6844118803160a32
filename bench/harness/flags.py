"""Automatic flags for unreliable evaluations (EVALUATION.md, "Automatic checks"). Each flag is
a dict ``{code, title, seen, try}`` stored with the cell and shown in the leaderboard's Flags
column (:func:`bench.core.schema.format_flags`; codes and advice in ``FLAG_DOCS`` there).

Where each check runs:

* :func:`defense_checks`, once per (dataset, defense): randomness (1), probability outputs (2),
  zero/NaN/unavailable input gradients (3); optionally (``checks: {large_eps_subset: N}``) a
  PGD run at Linf eps 0.5 on N clean-correct samples: accuracy above chance and an effectively
  unbounded attack below ~100% success (7).
* :func:`attack_checks`, per cell on the attack's records: silent success (6), the loss still
  moving at the end (5), BPDA surrogate transfer failures (9), and AutoAttack's own checks read
  from its captured log (randomised defense, probability outputs, zero gradients, Square beating
  the gradient attacks, dynamic defense).
* :func:`convergence_check`, per cell when ``checks: {convergence_subset: N}``: re-run the
  attack with doubled iterations on N clean-correct samples; a change of robust accuracy larger
  than ``convergence_tol`` (default 0.05) is non-convergence (5).
* :func:`matrix_checks`, at the end of a run across cells: black-box or transfer attacks
  breaking points every white-box attack missed (> 0.2% of points) (4), epsilon sweeps that are
  not monotone and accuracy above chance at Linf eps >= 0.5 (7), implausible detectors
  (Tramer 2021, against :data:`REFERENCE_ROBUST_ACCURACY`) (8). They are stored on the
  affected cells with ``scope: "matrix"`` and replaced on every run.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from bench.core.schema import CLEAN, AttackKind, flag
from bench.harness import checks as checks_
from bench.harness.scoring import AUTOATTACK_PATTERNS
from bench.harness.scoring import loss_still_moving as loss_still_moving  # re-exported
from bench.harness.scoring import result_records as result_records  # re-exported


# -----------------------------------------------------------------------------------------------
# per (dataset, defense)
# -----------------------------------------------------------------------------------------------
@torch.no_grad()
def _forward(defense, x):
    return defense(x).float()


def defense_checks(defense, images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0,
                   n: int = 16, checks: Mapping[str, Any] | None = None,
                   draws: int = 1) -> list[dict]:
    """Randomness, probability outputs and input gradients on a few clean samples (and the
    large-epsilon sanity run when ``checks['large_eps_subset']`` > 0)."""
    flags = []
    x, y = images[:n], labels[:n]
    with checks_.seeded(x, seed):
        outs = [_forward(defense, x) for _ in range(3)]
    declared = bool(defense.structure.random) if hasattr(defense, "structure") else False
    diff = checks_.max_difference(outs)
    if diff > 1e-4:
        flags.append(flag("randomness", f"repeated forward passes differ by up to {diff:.3g}"
                          + ("" if declared else " although the defense does not declare "
                             "randomness"), declared=declared))
    if checks_.looks_like_probabilities(outs[0]):
        flags.append(flag("probability_outputs", "every output row lies in [0, 1] and sums to 1"))
    grad, err = checks_.input_gradient(defense, x, y)  # cross-entropy, as attacks use it
    if grad is None:
        flags.append(flag("zero_gradients", "input gradients are unavailable" +
                          (f" ({err})" if err else "")))
    else:
        bad = checks_.bad_gradients(grad)
        if bad.any():
            flags.append(flag("zero_gradients", f"{int(bad.sum())}/{len(bad)} samples have zero "
                              "or NaN input gradients"))
    m = int((checks or {}).get("large_eps_subset", 0) or 0)
    if m > 0:
        flags += large_eps_check(defense, images, labels, n=m, seed=seed, draws=draws)
    return flags


def large_eps_check(defense, images: torch.Tensor, labels: torch.Tensor, *, n: int = 16,
                    eps: float = 0.5, steps: int = 20, seed: int = 0, draws: int = 1) -> list[dict]:
    """PGD (Linf, ``eps`` 0.5) on ``n`` samples: accuracy must not exceed chance and success on
    the clean-correct ones must be ~100% (EVALUATION.md check 7). Classification only: a
    detector's rejections do not count here, the check is about the attack's gradients."""
    from bench.core.registry import create_attack
    from bench.harness.scoring import score

    x, y = images[:n], labels[:n]
    with torch.no_grad():
        num_classes = int(defense(x[:1]).shape[1])
    clean = score(_NoDetect(defense), x, y, draws=draws, seed=seed).correct
    st = getattr(defense, "structure", None)
    if st is not None and (not st.preprocessor_differentiable or st.random):
        # the gradients the row's adaptive attacks use (BPDA / EOT), not the masked ones
        attack = create_attack("adaptive", threat="linf", inner="pgd",
                               inner_options={"steps": steps}, seed=seed)
    else:
        attack = create_attack("pgd", threat="linf", steps=steps, seed=seed)
    adv = attack(defense, x, y, eps, seed=seed).adv
    correct = score(_NoDetect(defense), adv, y, draws=draws, seed=seed).correct
    acc = float(correct.float().mean())
    chance = 1.0 / num_classes
    flags = []
    if acc > chance:
        flags.append(flag("above_chance_large_eps", f"PGD-{steps} at Linf eps {eps} left "
                          f"{acc:.0%} accuracy on {len(y)} samples (chance {chance:.0%})"))
    if clean.any():
        success = float((~correct[clean]).float().mean())
        if success < 0.95:
            flags.append(flag("unbounded_attack_fails", f"PGD-{steps} at Linf eps {eps} broke "
                              f"only {success:.0%} of {int(clean.sum())} clean-correct samples"))
    return flags


class _NoDetect(torch.nn.Module):
    """The defense's classification path only (for the sanity checks)."""

    def __init__(self, defense) -> None:
        super().__init__()
        self.defense = defense

    @property
    def structure(self):
        return self.defense.structure

    def forward(self, x):
        return self.defense(x)


# -----------------------------------------------------------------------------------------------
# per cell
# -----------------------------------------------------------------------------------------------


#: batch-record keys summed over a cell's batches
_SUMMED = ("surrogate_adversarial", "surrogate_transfer_failures", "detector_evading",
           "source_adversarial")


def aggregate_extras(extras: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Cell-level records from the batch records (sums, and the union of AA warnings)."""
    extras = list(extras)
    agg: dict[str, Any] = {}
    for k in _SUMMED:
        vals = [e[k] for e in extras if isinstance(e.get(k), (int, float))]
        if vals:
            agg[k] = sum(vals)
    for k in ("surrogate_kind", "bpda", "eot_draws", "reject_class"):
        vals = [e[k] for e in extras if k in e]
        if vals:
            agg[k] = vals[0]
    warn = [w for e in extras for w in e.get("autoattack_warnings", [])]
    if warn:
        agg["autoattack_warnings"] = list(dict.fromkeys(warn))
    return agg


def attack_checks(records: Mapping[str, Any]) -> list[dict]:
    """Checks on one cell's aggregated attack records."""
    flags = []
    silent = records.get("silent_success", 0)
    recovered = int(records.get("recovered_best_iterates", 0) or 0)
    if silent:
        flags.append(flag("silent_success", f"{silent} samples had an adversarial intermediate "
                          "iterate but the returned point is not adversarial"))
    elif recovered:  # repaired (the best iterate is stored) but still an attack failure
        flags.append(flag("silent_success", f"{recovered} samples: the attack returned a "
                          "non-adversarial point although an intermediate iterate was "
                          "adversarial; the best iterate was returned instead",
                          repaired=recovered))
    moving = records.get("loss_still_moving")
    if moving:
        flags.append(flag("non_convergence", f"mean loss rose by {moving:.1%} over the last 20% "
                          "of the steps"))
    fails = int(records.get("surrogate_transfer_failures", 0) or 0)
    sur = int(records.get("surrogate_adversarial", 0) or 0)
    if records.get("surrogate_kind") == "surrogate" and fails >= 2 and fails > 0.2 * sur:
        flags.append(flag("surrogate_transfer_failure", f"{fails} of {sur} points adversarial "
                          "on the BPDA surrogate are not adversarial on the real defense"))
    seen_codes: set[str] = set()
    for line in records.get("autoattack_warnings", []):
        for pattern, code in AUTOATTACK_PATTERNS.items():
            if pattern in line and code not in seen_codes:
                seen_codes.add(code)
                flags.append(flag(code, f"AutoAttack: {line.strip()}", source="autoattack"))
    return flags


def doubled_spec(spec, threat: str):
    """The same attack with doubled iterations (steps, n_iter or n_queries; inside
    ``inner_options`` for wrappers), or None when the attack has no iteration knob."""
    from bench.core.config import ComponentSpec
    from bench.harness.planning import create_attack

    def double(opts: dict[str, Any], attack) -> dict[str, Any] | None:
        have = attack.options
        for knob, default in (("steps", None), ("n_iter", 100), ("n_queries", 5000)):
            if knob in have:
                cur = have[knob] if have[knob] is not None else default
                if cur is None:
                    continue
                return {**opts, knob: 2 * int(cur)}
        return None

    attack = create_attack(spec, threat)
    new = double(dict(spec.options), attack)
    if new is None and "inner" in attack.options:
        from bench.core.registry import ATTACKS

        inner_opts = dict(attack.options.get("inner_options") or {})
        inner = ATTACKS.create(attack.options["inner"], threat=threat, **inner_opts)
        d = double(inner_opts, inner)
        if d is not None:
            new = {**spec.options, "inner_options": d}
    return None if new is None else ComponentSpec(spec.name, new, spec.label + " x2")


def convergence_check(defense, spec, threat: str, eps: float, images: torch.Tensor,
                      labels: torch.Tensor, rows: list[dict], *, seed: int = 0, draws: int = 1,
                      checks: Mapping[str, Any] | None = None) -> list[dict]:
    """Re-run ``spec`` with doubled iterations on ``checks['convergence_subset']`` clean-correct
    samples of a finished cell (its stored ``rows``); flag a change of robust accuracy above
    ``checks['convergence_tol']`` (default 0.05)."""
    from bench.harness.planning import create_attack
    from bench.harness.scoring import Scored, attack_batch

    checks = checks or {}
    n = int(checks.get("convergence_subset", 0) or 0)
    if n <= 0 or spec is None:
        return []
    tol = float(checks.get("convergence_tol", 0.05))
    doubled = doubled_spec(spec, threat)
    if doubled is None:
        return []
    picked = [r for r in sorted(rows, key=lambda r: r["idx"])
              if r["clean_correct"] and not r["clean_flagged"]][:n]
    if not picked:
        return []
    idx = torch.tensor([r["idx"] for r in picked])
    x, y = images[idx.to(images.device)], labels[idx.to(labels.device)]
    ones = torch.ones(len(y), dtype=torch.bool, device=y.device)
    clean = Scored(y.clone(), ones, ~ones)
    attack = create_attack(doubled, threat, seed=seed)
    new_rows, _, _ = attack_batch(defense, attack, x, y, eps, clean=clean, seed=seed, draws=draws)
    before = sum(r["robust"] for r in picked) / len(picked)
    after = sum(r["robust"] for r in new_rows) / len(new_rows)
    if abs(before - after) > tol:
        knob = {k: v for k, v in doubled.options.items() if k in ("steps", "n_iter", "n_queries",
                                                                  "inner_options")}
        return [flag("non_convergence", f"doubling the iterations ({knob}) changed robust "
                     f"accuracy on {len(picked)} samples from {before:.0%} to {after:.0%}",
                     before=before, after=after)]
    return []


# -----------------------------------------------------------------------------------------------
# across cells
# -----------------------------------------------------------------------------------------------
#: best known classifier robust accuracy per (dataset, threat), with sources: bench/core/anchors.py
from bench.core.anchors import REFERENCE_ROBUST_ACCURACY as REFERENCE_ROBUST_ACCURACY  # noqa: E402
from bench.core.anchors import reference_accuracy as reference_accuracy  # noqa: E402


def attack_kind(cell) -> str:
    """white-box, black-box, transfer, semantic, or clean (from the stored spec)."""
    spec = cell.spec or {}
    name = spec.get("attack", cell.attack)
    if name == CLEAN:
        return AttackKind.CLEAN.value
    conf = spec.get("attack_config") or {}
    if conf.get("kind"):
        return conf["kind"]
    if name == "square" or (name.startswith("autoattack") and
                            list(conf.get("attacks") or []) == ["square"]):
        return AttackKind.BLACK_BOX.value
    if name == "wrong_label_latent":
        return AttackKind.SEMANTIC.value
    return AttackKind.WHITE_BOX.value


def attack_kind_name(name: str) -> str:
    """white-box / black-box / semantic from a registry name alone (for the per-cell checks)."""
    if name == "square":
        return AttackKind.BLACK_BOX.value
    if name in ("transfer",):
        return "transfer"
    if name == "wrong_label_latent":
        return AttackKind.SEMANTIC.value
    return AttackKind.WHITE_BOX.value


def matrix_checks(store, *, reference: Mapping | None = None,
                  blackbox_tol: float = 0.002) -> dict[str, list[dict]]:
    """Checks across the finished cells of ``store``; returns {cell key: flags} (flags carry
    ``scope: "matrix"``). :meth:`ResultStore.set_flags` stores them."""
    current = store.current_keys()  # not the superseded cells of an earlier configuration
    cells = [c for c in store.cells("done") if c.key in current]
    samples = {c.key: {r["sample_id"]: r for r in store.samples(c.key)} for c in cells}
    out: dict[str, list[dict]] = {}

    def add(key: str, f: dict) -> None:
        f["scope"] = "matrix"
        if all(g["code"] != f["code"] for g in out.get(key, [])):
            out.setdefault(key, []).append(f)

    by_defense: dict[tuple[str, str], list] = {}
    for c in cells:
        by_defense.setdefault((c.dataset, c.defense), []).append(c)
    for (dataset, _defense), dcells in by_defense.items():
        clean = [c for c in dcells if attack_kind(c) == "clean"]
        if not clean:
            continue
        base = samples[clean[0].key]
        n = len(base)
        clean_ok = {s for s, r in base.items() if r["clean_correct"] and not r["clean_flagged"]}
        groups: dict[tuple[str, float], list] = {}
        for c in dcells:
            if attack_kind(c) != "clean":
                groups.setdefault((c.threat, round(float(c.eps), 8)), []).append(c)
        worst: dict[tuple[str, float], int] = {}
        for (threat, eps), gcells in groups.items():
            broken = {c.key: {s for s, r in samples[c.key].items() if not r["robust"]}
                      for c in gcells}
            wb = [c for c in gcells if attack_kind(c) == "white-box"]
            bb = [c for c in gcells if attack_kind(c) in ("black-box", "transfer")]
            wb_broken = set().union(*(broken[c.key] for c in wb)) if wb else set()
            for c in bb if wb else []:
                only = (broken[c.key] - wb_broken) & clean_ok
                if n and len(only) / n > blackbox_tol:
                    for w in wb:
                        add(w.key, flag("blackbox_beats_whitebox",
                                        f"{c.attack} broke {len(only)} of {n} points "
                                        f"({len(only) / n:.1%}) that every white-box attack "
                                        "missed"))
            robust = set(clean_ok)
            for c in gcells:
                robust -= broken[c.key]
            worst[(threat, eps)] = len(robust)
            acc = len(robust) / n if n else 0.0
            if threat == "linf" and eps >= 0.5 - 1e-9:
                k = _num_classes(dataset, gcells)
                if k and acc > 1.0 / k:
                    for c in gcells:
                        add(c.key, flag("above_chance_large_eps", f"worst-case accuracy "
                                        f"{acc:.0%} at Linf eps {eps:.3g} (chance {1 / k:.0%})"))
            has_detector = any((c.provenance.get("structure") or {}).get("has_detector")
                               for c in gcells)
            ref = reference_accuracy(dataset, threat, eps / 2, reference) if has_detector else None
            if ref is not None and acc > ref:
                for c in gcells:
                    add(c.key, flag("implausible_detector", f"robust detection accuracy {acc:.1%} "
                                    f"at eps {eps:.4g} beats the best known classifier robust "
                                    f"accuracy at eps/2 ({ref:.1%}, reference table)"))
        # epsilon sweeps: the worst case, and each attack whose cells are complete
        by_threat: dict[str, list] = {}
        for (threat, eps), k in worst.items():
            by_threat.setdefault(threat, []).append((eps, k))
        for threat, pts in by_threat.items():
            pts.sort()
            for (e0, k0), (e1, k1) in zip(pts, pts[1:]):
                if k1 > k0:
                    for c in groups[(threat, e1)]:
                        add(c.key, flag("non_monotone_eps", f"worst-case robust points rise from "
                                        f"{k0} at eps {e0:.4g} to {k1} at eps {e1:.4g}"))
        per_attack: dict[tuple[str, str], list] = {}
        for (threat, eps), gcells in groups.items():
            for c in gcells:
                if len(samples[c.key]) == n:
                    per_attack.setdefault((threat, c.attack), []).append(
                        (eps, sum(r["robust"] for r in samples[c.key].values()), c))
        for (threat, name), pts in per_attack.items():
            pts.sort(key=lambda p: p[0])
            for (e0, k0, _), (e1, k1, c1) in zip(pts, pts[1:]):
                if k1 > k0:
                    add(c1.key, flag("non_monotone_eps", f"{name}: robust points rise from {k0} "
                                     f"at eps {e0:.4g} to {k1} at eps {e1:.4g}"))
    return out


def _num_classes(dataset: str, cells: list) -> int | None:
    try:
        from bench.data import dataset_info

        return int(dataset_info(dataset).num_classes)
    except Exception:  # noqa: BLE001 - unknown dataset: skip the chance check
        return None


def store_matrix_flags(store, **kw: Any) -> dict[str, list[dict]]:
    """Run :func:`matrix_checks` and store the result on every finished cell (replacing the
    previous matrix flags, so a re-run never duplicates them)."""
    found = matrix_checks(store, **kw)
    for c in store.cells("done"):
        store.set_flags(c.key, found.get(c.key, []), scope="matrix")
    return found
