"""``robustmatrix sweep``: one attack configuration over a grid of epsilons for an existing
entry, run through the matrix runner, for the robust-accuracy-vs-epsilon plot; the sweep's
own sanity flags (monotone in epsilon, chance at large epsilon).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness.submission.load import SubmitError, register_from_entry, resolve_run_dir
from bench.harness.submission.submit import _runner_fingerprint

# the epsilon sweep ---------------------------------------------------------------------------
#: the default sweep attack: PGD through the view the defense's structure calls for (BPDA for a
#: non-differentiable preprocessor, EOT for a random defense, plain PGD otherwise)
SWEEP_ATTACK = {"name": "adaptive", "inner": "pgd", "inner_options": {"steps": 20}}


def sweep_attack_for(base: dict[str, Any] | str) -> dict[str, Any]:
    """``base`` (a PGD-like suite attack) wrapped in the structure-chosen adaptive view."""
    b = {"name": base} if isinstance(base, str) else dict(base)
    if b["name"] not in ("pgd", "test_pgd"):
        return {k: v for k, v in b.items()}
    opts = {k: v for k, v in b.items() if k not in ("name", "label")}
    return {"name": "adaptive", "inner": b["name"], "inner_options": opts,
            "label": f"adaptive {b.get('label', b['name'])}"}


def run_sweep(entry_path: str | Path, eps_values: list[float], *,
              attack: str | dict[str, Any] = SWEEP_ATTACK,
              device: str | None = None, progress: bool = False,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ONE attack configuration over ``eps_values`` through the MatrixRunner (in the
    entry's run directory, so finished cells are reused), store the curve in the entry
    (``entry["sweep"]``) and flag a non-monotone curve or above-chance accuracy at a huge
    Linf epsilon (EVALUATION.md, check 7)."""
    from bench.core.config import config_from_dict
    from bench.data import dataset_info
    from bench.harness.runner import MatrixRunner
    from leaderboard.entries import read_entry, write_entry
    from leaderboard.table import build_records

    entry = read_entry(entry_path)
    entry["_path"] = str(entry_path)
    run_dir = resolve_run_dir(entry)
    name, _ = register_from_entry(entry)
    prov = entry["provenance"]
    cfg0 = prov.get("config") or {}
    a = dict(attack) if isinstance(attack, dict) else {"name": attack}
    a.setdefault("label", a["name"] if a["name"] != "adaptive" else
                 f"adaptive {a.get('inner', 'pgd')}")
    ds = {"name": entry["dataset"], "n": entry["n"], **(prov.get("dataset_options") or {})}
    raw = {"name": "sweep", "datasets": [ds],
           "defenses": [{"name": name, "label": entry["defense"]["label"],
                         "options": prov.get("defense_options") or {}}],
           "attacks": [a], "threat_models": {entry["threat"]: list(eps_values)},
           "seed": prov.get("seed", 0), "device": device or cfg0.get("device", "auto"),
           "batch_size": prov.get("batch_size") or 100,
           "random_draws": prov.get("random_draws") or 5,
           "fit_preset": prov.get("fit_preset") or "quick", "run_dir": str(run_dir),
           "adaptive": False}  # one attack configuration: choose an adaptive one explicitly
    cfg = config_from_dict(raw, source="sweep")
    runner = MatrixRunner(cfg, progress=progress, log=log, run_dir=run_dir)
    runner.run()
    fingerprint = _runner_fingerprint(runner.store, name)
    spec = cfg.attacks[0]
    wanted = {round(float(e), 8) for e in cfg.threat_models[entry["threat"]]}
    keys = [c.key for c in runner.store.cells("done")
            if c.spec.get("defense") == name and c.spec.get("defense_sha256") == fingerprint
            and c.spec.get("seed") == cfg.seed and c.spec.get("data") == prov.get(
                "data_fingerprint") and (prov.get("pixels_sha256") is None
                                     or c.spec.get("pixels") in (None, prov["pixels_sha256"]))
            and (c.attack == "clean" or (
                    c.spec.get("attack") == spec.name and c.spec.get("attack_options") ==
                    spec.options and c.threat == entry["threat"]
                    and round(float(c.eps), 8) in wanted))]
    recs = build_records(runner.store, keys)
    points = sorted(({"eps": r["eps"], "clean": r["clean"],
                      "robust": next(iter(r["attacks"].values())),
                      "worst_case": r["worst_case"]} for r in recs), key=lambda p: p["eps"])
    flags = sweep_flags(points, entry["threat"], dataset_info(entry["dataset"]).num_classes,
                        a["label"])
    entry["sweep"] = {"attack": a["label"], "attack_spec": a, "threat": entry["threat"],
                      "points": points}
    own = [prov["clean_cell_key"]] + [v["cell_key"] for v in entry["attacks"].values()]
    cell_flags = [r["flags"] for r in build_records(runner.store, own)
                  if r["threat"] == entry["threat"] and abs(r["eps"] - entry["eps"]) < 1e-9]
    entry["flags"] = ([f for f in entry["flags"] if f.get("source") == "validation"]
                      + (cell_flags[0] if cell_flags else [f for f in entry["flags"]
                                                            if f.get("source") is None])
                      + flags)  # cell flags refreshed: the run may have added matrix-level ones
    write_entry(entry, Path(entry_path).parent)
    return entry["sweep"]


def sweep_flags(points: list[dict], threat: str, num_classes: int, attack: str) -> list[dict]:
    from bench.core.schema import flag

    out = []
    for i, p in enumerate(points):
        for q in points[i + 1:]:
            if q["worst_case"]["accuracy"] > p["worst_case"]["ci_high"] + 1e-12:
                out.append({**flag("eps_sweep", f"{attack}: robust accuracy rises from "
                                   f"{100 * p['worst_case']['accuracy']:.1f}% at eps "
                                   f"{p['eps']:.4g} "
                                   f"to {100 * q['worst_case']['accuracy']:.1f}% at eps "
                                   f"{q['eps']:.4g} (beyond its 95% interval)"),
                            "source": "sweep"})
                break
        else:
            continue
        break
    for p in points:
        if (threat == "linf" and p["eps"] >= 0.5 - 1e-9
                and p["worst_case"]["ci_low"] > 1 / num_classes):
            out.append({**flag("eps_sweep", f"{attack}: accuracy "
                               f"{100 * p['worst_case']['accuracy']:.1f}% "
                               f"at Linf eps {p['eps']:.3g} is above chance "
                               f"({100 / num_classes:.0f}%): the attack cannot be working"),
                        "source": "sweep"})
    for f in out:
        if f["title"] == "eps_sweep":
            f.update(title="Epsilon sweep is implausible",
                     **{"try": "check the attack's gradients (BPDA / EOT) and step size; an honest "
                               "curve falls monotonically to chance"})
    return out


def parse_eps_list(text: str) -> list[float]:
    from bench.core.config import parse_eps

    vals = [parse_eps(t, "--eps") for t in str(text).split(",") if t.strip()]
    if not vals:
        raise SubmitError(f"--eps {text!r}: give a comma-separated list, e.g. 0,2/255,4/255,8/255")
    if any(math.isnan(v) for v in vals):
        raise SubmitError("--eps: NaN is not an epsilon")
    return sorted(set(vals))
