"""Leaderboard tables: one pandas DataFrame per (dataset, threat model, epsilon).

Rows are defenses; columns are clean accuracy, robust accuracy per attack, and the worst case:
a sample is robust only if it is clean-correct (not rejected) and NO attack broke it
(a per-sample AND, never a minimum of averages). Every accuracy carries a 95% Wilson interval;
defenses whose worst-case intervals overlap share a rank ("=").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import pandas as pd

from bench.core.schema import format_flags
from bench.core.store import ResultStore

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for k successes out of n (robust for small n and k = 0, n)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class Accuracy:
    k: int
    n: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def ci(self) -> tuple[float, float]:
        return wilson_interval(self.k, self.n)

    def as_dict(self) -> dict[str, Any]:
        lo, hi = self.ci
        return {"accuracy": self.value, "ci_low": lo, "ci_high": hi, "k": self.k, "n": self.n}


def _group_key(row) -> tuple[str, str, float]:
    return (row["dataset"], row["threat"], round(float(row["eps"]), 8))


def build_records(store: ResultStore, keys: Iterable[str] | None = None
                  ) -> list[dict[str, Any]]:
    """One record per (dataset, threat, eps, defense): numbers stay numbers until rendering.

    ``keys``: the cells to use (a run's own, :attr:`bench.harness.runner.RunSummary.keys`); default:
    the current cells of the store (:meth:`ResultStore.current_keys`)."""
    return [rec for rec, _ in _boards(store, keys)]


def worst_case_samples(store: ResultStore, keys: Iterable[str] | None = None
                       ) -> dict[tuple[str, str, float, str], pd.Series]:
    """The per-sample worst case behind :func:`build_records`' ``worst_case``: for each
    (dataset, threat, eps, defense) a boolean Series indexed by sample id (True: clean-correct,
    not rejected, and no attack broke it). Paired comparisons (:mod:`leaderboard.compare`)
    start here."""
    return {(r["dataset"], r["threat"], r["eps"], r["defense"]): robust
            for r, robust in _boards(store, keys)}


def _boards(store: ResultStore, keys: Iterable[str] | None):
    """Yield (record, per-sample worst case) per (dataset, threat, eps, defense)."""
    df = store.samples_frame()
    df = df[df["cell_key"].isin(set(keys) if keys is not None else store.current_keys())]
    if df.empty:
        return
    cells = {c.key: c for c in store.cells("done")}
    clean = df[df["attack"] == "clean"]
    attacked = df[df["attack"] != "clean"]
    for (dataset, threat, eps), g in attacked.groupby(["dataset", "threat", "eps"], sort=True):
        for defense, gd in g.groupby("defense", sort=False):
            base = clean[(clean["dataset"] == dataset) & (clean["defense"] == defense)]
            if base.empty:
                continue
            base = base.drop_duplicates("sample_id").set_index("sample_id")
            clean_ok = (base["clean_correct"].astype(bool) & ~base["clean_flagged"].fillna(0)
                        .astype(bool))
            n = len(base)
            robust = clean_ok.copy()
            per_attack: dict[str, Any] = {}
            flags: dict[str, dict] = {}
            cost = {"forward_passes": 0, "backward_passes": 0, "wall_time": 0.0}
            for attack, ga in gd.groupby("attack", sort=False):
                ga = ga.drop_duplicates("sample_id").set_index("sample_id")
                r = ga["robust"].astype(bool).reindex(base.index)
                robust &= r.fillna(True).astype(bool)  # absent = not attacked (worst-case schedule)
                complete = len(ga) == n
                per_attack[attack] = {**Accuracy(int(r.fillna(False).sum()), n).as_dict(),
                                      "complete": complete, "n_attacked": len(ga)}
                aurocs = [(cells[k].metrics or {}).get("detector", {}).get("auroc")
                          for k in ga["cell_key"].unique()]
                aurocs = [a for a in aurocs if a is not None]
                flagged = ga["adv_flagged"].fillna(0).astype(bool)
                if aurocs or flagged.any():  # a detector defense
                    per_attack[attack]["detector"] = {  # among the samples this attack ran on
                        "detection_rate": float(flagged.mean()),
                        "auroc": aurocs[-1] if aurocs else None}
                for key in ga["cell_key"].unique():
                    c = cells[key]
                    cost["forward_passes"] += c.forward_passes or 0
                    cost["backward_passes"] += c.backward_passes or 0
                    cost["wall_time"] += c.wall_time or 0.0
                    for f in c.flags:
                        flags.setdefault(f["code"], {**f, "attacks": []})["attacks"].append(attack)
            for f in flags.values():  # raised on every cell: a property of the defense
                if len(per_attack) > 1 and set(f["attacks"]) == set(per_attack):
                    f["attacks"] = ["all attacks"]
            fpr = float(base["clean_flagged"].fillna(0).mean())
            yield ({
                "dataset": dataset, "threat": threat, "eps": float(eps), "defense": defense,
                "n": n, "clean": Accuracy(int(clean_ok.sum()), n).as_dict(),
                "attacks": per_attack, "worst_case": Accuracy(int(robust.sum()), n).as_dict(),
                "flags": list(flags.values()), "cost": cost,
                "detector_fpr": fpr if base["clean_flagged"].fillna(0).any() else None,
            }, robust.astype(bool))


def _fmt(acc: dict[str, Any]) -> str:
    return f"{100 * acc['accuracy']:.1f} [{100 * acc['ci_low']:.0f}, {100 * acc['ci_high']:.0f}]"


def _eps_label(threat: str, eps: float) -> str:
    if threat == "linf":
        e255 = eps * 255
        if abs(e255 - round(e255)) < 1e-6:
            return f"Linf eps={round(e255)}/255"
        return f"Linf eps={eps:.4g}"
    return f"{threat.upper()} eps={eps:.4g}"


def rank(records: list[dict[str, Any]]) -> list[int | str]:
    """Ranks by worst case (records sorted best first). A defense whose interval overlaps the
    interval of its tie group's LEADER (the first row of the group) shares the leader's rank
    ("="); otherwise it starts a new group. Ties do not chain: 38 [26, 52], 16 [8, 29] and
    0 [0, 7] are ranked 1, =1, 3, not all =1 (each overlaps the one above, but 0 [0, 7] does
    not overlap the leader). Use ``robustmatrix leaderboard --compare A B`` for the paired
    test of two rows on the same images."""
    out: list[int | str] = []
    leader: tuple[int, float] | None = None  # (rank, lower bound of the leader's interval)
    for i, r in enumerate(records):
        lo, hi = r["worst_case"]["ci_low"], r["worst_case"]["ci_high"]
        if leader is not None and hi >= leader[1]:
            out.append(f"={leader[0]}")
        else:
            leader = (i + 1, lo)
            out.append(i + 1)
    return out


def build_tables(store: ResultStore, *, per_attack: bool = True, show_cost: bool = False,
                 keys: Iterable[str] | None = None, flag_detail: bool = True,
                 records: list[dict[str, Any]] | None = None) -> dict[str, pd.DataFrame]:
    """Display tables keyed by "dataset | threat eps" (strings are made only here), from
    ``records`` when the caller already built them (:func:`build_records`)."""
    recs = records if records is not None else build_records(store, keys)
    groups: dict[tuple, list[dict]] = {}
    for r in recs:
        groups.setdefault((r["dataset"], r["threat"], r["eps"]), []).append(r)
    tables = {}
    for (dataset, threat, eps), rs in groups.items():
        rs = sorted(rs, key=lambda r: (-r["worst_case"]["accuracy"], -r["clean"]["accuracy"]))
        attacks = list(dict.fromkeys(a for r in rs for a in r["attacks"]))
        has_fpr = any(r["detector_fpr"] is not None for r in rs)
        rows = []
        for rk, r in zip(rank(rs), rs):
            row = {"Rank": rk, "Defense": r["defense"], "Clean %": _fmt(r["clean"])}
            if per_attack:
                for a in attacks:
                    acc = r["attacks"].get(a)
                    row[f"{a} %"] = ("" if acc is None else _fmt(acc) if acc["complete"]
                                     else f"({acc['n_attacked']} attacked)")
            row["Worst case %"] = _fmt(r["worst_case"])
            if has_fpr:  # detectors' clean false-positive rate; "-" for the other defenses
                row["Detector FPR %"] = ("-" if r["detector_fpr"] is None
                                         else f"{100 * r['detector_fpr']:.1f}")
                for a in attacks:  # detection rate (flagged adversarials) and AUROC per attack
                    det = (r["attacks"].get(a) or {}).get("detector")
                    row[f"{a} detected % | AUROC"] = (
                        "-" if r["detector_fpr"] is None or det is None else
                        f"{100 * det['detection_rate']:.1f} | "
                        + ("-" if det["auroc"] is None else f"{det['auroc']:.2f}"))
            if show_cost:
                row["Fwd passes"] = r["cost"]["forward_passes"]
                row["Bwd passes"] = r["cost"]["backward_passes"]
                row["Wall s"] = round(r["cost"]["wall_time"], 1)
            # code [attacks]: seen (try: ...), or the codes alone
            row["Flags"] = format_flags(r["flags"], detail=flag_detail)
            rows.append(row)
        tables[f"{dataset} | {_eps_label(threat, eps)}"] = pd.DataFrame(rows)
    return tables
