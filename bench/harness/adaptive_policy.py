"""The adaptive-attack policy: WHICH adaptive attacks a defense gets, read from its declared
structure (EVALUATION.md, "Adaptive attacks are chosen from the defense's structure").

The attacks themselves live in ``attacks/adaptive.py``; this module only decides.
:func:`adaptive_attacks_for` maps a defense structure and the configured base attacks to the
adaptive cells the harness adds automatically (``adaptive: true`` in the config, the default);
:func:`adaptive_plans` is the runner's entry point.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from attacks.adaptive import structure_of
from bench.core.config import ComponentSpec
from bench.harness.planning import CellPlan, attack_threats

#: base attacks that the adaptive forms wrap (PGD family) and AutoAttack variants
PGD_LIKE = ("pgd", "test_pgd")
AUTOATTACK_LIKE = ("autoattack", "autoattack_cheap")


#: options of the ``adaptive:`` config entry and their defaults
ADAPTIVE_DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "eot_draws": 10,          # draws per gradient for EOT views
    "transfer": True,         # transfer (gray-box) cell for every defense with a preprocessor
    "reject_class": True,     # reject-class PGD for detectors (besides detector-aware PGD)
    "rand_autoattack": True,  # AutoAttack version=rand for random defenses (when AA is listed)
    "square": "auto",         # Square cell: "auto" = when zero/missing gradients are observed
    "square_queries": 1000,
    "wrong_label_latent": True,  # for semantic-autoencoder (latent) defenses
    "pgd_steps": 10,          # steps of the default PGD when no PGD is configured
    "detector_weight": 10.0,
    "detector_margin": 0.1,
    # a second BPDA cell with the IDENTITY backward for preprocessors that declare a surrogate
    # (the surrogate's gradient can be worse than the identity's; the worst case takes both)
    "bpda_identity": True,
}


def adaptive_options(raw: Any) -> dict[str, Any]:
    """The ``adaptive:`` config value (bool or mapping) merged over :data:`ADAPTIVE_DEFAULTS`."""
    opts = dict(ADAPTIVE_DEFAULTS)
    if raw is None or isinstance(raw, bool):
        opts["enabled"] = True if raw is None else raw
        return opts
    if not isinstance(raw, Mapping):
        raise ValueError(f"adaptive: expected true, false or a mapping of options, got {raw!r}")
    unknown = set(raw) - set(ADAPTIVE_DEFAULTS)
    if unknown:
        raise ValueError(f"adaptive: unknown option {sorted(unknown)[0]!r}; known: "
                         f"{sorted(ADAPTIVE_DEFAULTS)}")
    opts.update(raw)
    return opts


# ----------------------------------------------------------------------------------------------
# automatic choice from the defense structure
# ----------------------------------------------------------------------------------------------
def _spec(name: str, options: dict[str, Any], label: str):
    return ComponentSpec(name, options, label)


def adaptive_attacks_for(defense_structure: Any, base_attacks: Iterable[Any], *,
                         options: Any = None, latent: bool = False,
                         observed_flags: Iterable[str] = ()) -> list:
    """The adaptive cells a defense needs, as ComponentSpecs (name, options, label).

    ``defense_structure``: a :class:`defenses.base.DefenseStructure` or its dict;
    ``base_attacks``: the configured ComponentSpecs (the PGD-family ones are wrapped; when none
    is configured a ``pgd`` with ``pgd_steps`` steps is used); ``latent``: the defense purifies
    through a semantic autoencoder; ``observed_flags``: codes of the defense-level flags seen
    on it (undeclared ``randomness`` turns on EOT, ``zero_gradients`` adds a Square cell).

    Rules (EVALUATION.md): non-differentiable preprocessor -> BPDA (surrogate when declared,
    and then also an identity-backward BPDA cell, ``bpda_identity``) around the PGD-family
    attacks and around a configured AutoAttack (APGD);
    random -> EOT, and AutoAttack ``rand`` when AutoAttack is configured; detector ->
    detector-aware PGD and reject-class PGD; any preprocessor -> transfer from the bare
    classifier; latent defenses -> the wrong-label latent attack. Undefended models get none.
    """
    o = adaptive_options(options)
    if not o["enabled"]:
        return []
    s = defense_structure.as_dict() if hasattr(defense_structure, "as_dict") else dict(
        defense_structure)
    observed = set(observed_flags)
    random = bool(s.get("random")) or "randomness" in observed
    nondiff = bool(s.get("has_preprocessor")) and not s.get("preprocessor_differentiable", True)
    detector = bool(s.get("has_detector"))
    base = list(base_attacks)
    pgd_bases = [a for a in base if a.name in PGD_LIKE] or [
        _spec("pgd", {"steps": int(o["pgd_steps"])}, "pgd")]
    draws = int(o["eot_draws"]) if random else 0
    out = []
    for b in pgd_bases:
        inner_opts = {k: v for k, v in b.options.items() if k != "threat"}
        wrap: dict[str, Any] = {"inner": b.name, "inner_options": inner_opts}
        if "threat" in b.options:
            wrap["threat"] = b.options["threat"]
        if nondiff or random:
            prefix = ("bpda+" if nondiff else "") + ("eot+" if random else "")
            out.append(_spec("adaptive", {**wrap, "bpda": nondiff, "eot": draws,
                                          "detector": "ignore"}, f"{prefix}{b.label}"))
            if nondiff and s.get("has_surrogate") and o["bpda_identity"]:
                out.append(_spec("adaptive", {**wrap, "bpda": True, "surrogate": "identity",
                                              "eot": draws, "detector": "ignore"},
                                 f"bpda-identity+{'eot+' if random else ''}{b.label}"))
        if detector:
            steps = inner_opts.get("steps", 3 if b.name == "test_pgd" else 10)
            dap = {"steps": steps, "bpda": nondiff, "eot": draws,
                   "weight": float(o["detector_weight"]), "margin": float(o["detector_margin"])}
            if "threat" in b.options:
                dap["threat"] = b.options["threat"]
            out.append(_spec("detector_aware_pgd", dap, f"detector-aware {b.label}"))
            if o["reject_class"]:
                out.append(_spec("adaptive", {**wrap, "bpda": nondiff, "eot": draws,
                                              "detector": "reject-class"},
                                 f"reject-class {b.label}"))
        if s.get("has_preprocessor") and o["transfer"]:
            out.append(_spec("transfer", wrap, f"transfer {b.label}"))
    if nondiff and not random:  # APGD (AutoAttack) through the same BPDA view
        for a in base:
            if a.name in AUTOATTACK_LIKE and a.options.get("version") != "rand":
                opts = {k: v for k, v in a.options.items() if k != "threat"}
                spec_opts: dict[str, Any] = {"inner": a.name, "inner_options": opts, "bpda": True,
                                             "eot": 0, "detector": "ignore"}
                if "threat" in a.options:
                    spec_opts["threat"] = a.options["threat"]
                out.append(_spec("adaptive", spec_opts, f"bpda+{a.label}"))
    if random and o["rand_autoattack"]:
        for a in base:
            if a.name not in AUTOATTACK_LIKE or a.options.get("version") == "rand":
                continue
            cheap = a.name == "autoattack_cheap" or a.options.get("version") == "cheap"
            opts: dict[str, Any] = {"version": "rand"}
            if cheap or a.options.get("n_iter"):
                opts["n_iter"] = int(a.options.get("n_iter") or 20)
                opts["eot_iter"] = max(2, int(o["eot_draws"]))
            if "threat" in a.options:
                opts["threat"] = a.options["threat"]
            out.append(_spec("autoattack", opts, f"{a.label} rand"))
    want_square = o["square"] is True or (o["square"] == "auto" and "zero_gradients" in observed)
    if want_square:
        out.append(_spec("square", {"n_queries": int(o["square_queries"])}, "square"))
    if latent and o["wrong_label_latent"]:
        out.append(_spec("wrong_label_latent", {}, "wrong-label latent"))
    return out


def is_latent_defense(defense: Any) -> bool:
    """The defense purifies through a label-conditioned (semantic) autoencoder."""
    pre = getattr(defense, "preprocessor", None)
    ae = getattr(pre, "ae", None)
    return bool(ae is not None and hasattr(ae, "encode") and hasattr(ae, "decode")
                and getattr(ae, "label_conditioned", False))


def adaptive_plans(defense: Any, plans: list, options: Any = None,
                   observed_flags: Iterable[str] = ()) -> list:
    """The runner's entry point: adaptive CellPlans for one (dataset, defense) group.

    For every (threat, eps) of the group's attacked plans, :func:`adaptive_attacks_for` on the
    plans' base attacks; a spec is kept only where it supports the threat and its label is not
    already used by a configured attack, nor is it a stand-alone attack (square, wrong-label
    latent) the config already lists (the plain cells stay, so users see the gap)."""
    attacked = [p for p in plans if p.attack is not None]
    if not attacked:
        return []
    used = {p.attack.label for p in attacked}
    #: stand-alone attacks the user already configured (under any label) are not added again
    configured = {p.attack.name for p in attacked} & {"square", "wrong_label_latent"}
    latent = is_latent_defense(defense)
    structure = structure_of(defense)
    by_te: dict[tuple[str, float], list] = {}
    for p in attacked:
        by_te.setdefault((p.threat, p.eps), []).append(p)
    out = []
    for (threat, eps), ps in by_te.items():
        first = ps[0]
        for spec in adaptive_attacks_for(structure, [p.attack for p in ps], options=options,
                                         latent=latent, observed_flags=observed_flags):
            if spec.label in used or spec.name in configured:
                continue
            try:
                ok = threat in attack_threats(spec)
            except Exception:  # noqa: BLE001 - an inner attack without this threat
                ok = False
            if ok:
                out.append(CellPlan(first.dataset, first.defense, spec, threat, eps))
    return out
