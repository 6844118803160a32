"""``robustmatrix verify ENTRY``: re-check a leaderboard entry without trusting it.

Checks, in order (each a :class:`Check` with ``ok`` and a one-line ``detail``):

1. ``entry_integrity``: every accuracy agrees with its own counts and Wilson interval, and the
   entry's digest (over its scored content) is intact: a hand-edited number is caught here.
2. ``store_agreement``: the numbers recomputed from the run's result store (same cells, same
   per-sample AND) equal the entry's counts exactly.
3. ``adversarials``: every stored batch of adversarial tensors still hashes to the sha256 in the
   entry and in the store (changed or missing adversarials: a stale entry).
4. ``source`` / ``weights``: the source file still has the sha256 the entry records, checked
   BEFORE it is imported (a changed or re-pointed file is never imported; the snapshot taken at
   submission is used instead, and this check fails); the defense rebuilt from it (with the
   recorded trained weights) has the checkpoint sha256 of the entry (else: a stale entry).
5. ``data``: the evaluation images are the recorded ones (sample ids).
6. ``rescore``: the defense re-run on the stored adversarials (and clean images) gives
   accuracies inside the entry's 95% intervals, with per-sample agreement reported.
7. ``rerun``: a random sample of (attack, batch) pairs is attacked again from scratch; the re-run
   robust accuracy must fall inside the 95% interval of the stored one for those samples.

The verdict passes when every check passes. The command exits 0 (verified), 1 (failed) or 2
(the entry cannot be read).
"""

from __future__ import annotations

import json
import random as pyrandom
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from attacks.base import RunContext
from bench.core.hashing import file_sha256


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class VerifyReport:
    entry: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str, **data: Any) -> Check:
        c = Check(name, bool(ok), detail, data)
        self.checks.append(c)
        return c

    def get(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def format(self) -> str:
        lines = [f"verify {self.entry}"]
        for c in self.checks:
            lines.append(f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
        lines.append("  verdict: " + ("VERIFIED" if self.ok else "FAILED ("
                     + ", ".join(c.name for c in self.checks if not c.ok) + ")"))
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"entry": self.entry, "verified": self.ok,
                "checks": [asdict(c) for c in self.checks]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VerifyReport:
        """The report :meth:`as_dict` gave (e.g. from the sandboxed child of ``verify``)."""
        rep = cls(str(d["entry"]))
        for c in d.get("checks") or []:
            rep.checks.append(Check(str(c["name"]), bool(c["ok"]), str(c["detail"]),
                                    dict(c.get("data") or {})))
        return rep


def _within(value: float, acc: dict[str, Any], slack: float = 1e-9) -> bool:
    return acc["ci_low"] - slack <= value <= acc["ci_high"] + slack


def _sha(path: Path) -> str:
    return file_sha256(path)


def verify_entry(path: str | Path, *, rerun: int = 2, seed: int = 0, device: str = "cpu",
                 use_snapshot: bool = False, log: Callable[[str], None] = print) -> VerifyReport:
    import torch

    from bench.core.config import ComponentSpec
    from bench.core.store import ResultStore
    from bench.data import load_eval
    from bench.harness.planning import create_attack
    from bench.harness.runner import load_adv
    from bench.harness.scoring import Scored, attack_batch, score
    from bench.harness.submission.load import build_entry_defense, resolve_run_dir
    from leaderboard.entries import consistent_accuracy, entry_digest, read_entry
    from leaderboard.table import Accuracy, build_records

    entry = read_entry(path)
    entry["_path"] = str(path)
    rep = VerifyReport(str(path))

    # 1. the entry agrees with itself -----------------------------------------------------
    accs = {"clean": entry["clean"], "worst_case": entry["worst_case"],
            **{f"attack {a}": v for a, v in entry["attacks"].items()}}
    bad = [k for k, v in accs.items() if not consistent_accuracy(v)]
    digest_ok = entry_digest(entry) == entry["provenance"].get("entry_sha256")
    rep.add("entry_integrity", not bad and digest_ok,
            "accuracies, counts and intervals are consistent and the digest is intact"
            if not bad and digest_ok else
            ("numbers disagree with their own counts/intervals: " + ", ".join(bad) if bad else
             "the entry's digest does not match its content (hand-edited)"))

    # 2. the entry agrees with the store ----------------------------------------------------
    run_dir = resolve_run_dir(entry)
    store = ResultStore(run_dir / "results.sqlite", readonly=True)
    prov = entry["provenance"]
    keys = [prov["clean_cell_key"]] + [a["cell_key"] for a in entry["attacks"].values()]
    missing = [k for k in keys if store.cell(k) is None or store.cell(k).status != "done"]
    if missing:
        rep.add("store_agreement", False, f"{len(missing)} cell(s) of the entry are not in the "
                f"store {run_dir} (stale entry or a different run)")
        recs = []
    else:
        recs = [r for r in build_records(store, keys)
                if r["threat"] == entry["threat"] and abs(r["eps"] - entry["eps"]) < 1e-9]
    if recs:
        r = recs[0]
        diffs = []
        for label, got in [("clean", r["clean"]), ("worst_case", r["worst_case"])] + [
                (f"attack {a}", r["attacks"].get(a)) for a in entry["attacks"]]:
            claim = accs[label]
            if got is None or got["k"] != claim["k"] or got["n"] != claim["n"] or abs(
                    got["accuracy"] - claim["accuracy"]) > 1e-9:
                diffs.append(f"{label}: entry {claim['k']}/{claim['n']} "
                             f"({100 * claim['accuracy']:.1f}%), store "
                             f"{got['k'] if got else '?'}/{got['n'] if got else '?'}")
        stored_flags = {f["code"] for f in r["flags"]}
        entry_flags = {f["code"] for f in entry["flags"]}
        if stored_flags - entry_flags:
            diffs.append("flags missing from the entry: "
                         f"{', '.join(sorted(stored_flags - entry_flags))}")
        rep.add("store_agreement", not diffs, "the store gives exactly the entry's counts and flags"
                if not diffs else "; ".join(diffs))

    # 3. stored adversarial tensors -------------------------------------------------------
    adv_problems = []
    n_batches = 0
    for label, a in entry["attacks"].items():
        stored = {b["batch"]: b for b in store.batches(a["cell_key"])}
        for b in a["batches"]:
            n_batches += 1
            p = run_dir / b["path"]
            if not p.exists():
                adv_problems.append(f"{label} batch {b['batch']}: {b['path']} is missing")
            elif _sha(p) != b["sha256"]:
                adv_problems.append(f"{label} batch {b['batch']}: sha256 differs from the entry")
            elif stored.get(b["batch"], {}).get("adv_sha256") != b["sha256"]:
                adv_problems.append(f"{label} batch {b['batch']}: the store records another sha256")
    rep.add("adversarials", not adv_problems, f"{n_batches} stored batches match their sha256"
            if not adv_problems else "; ".join(adv_problems[:3]) + (
                f" (+{len(adv_problems) - 3} more)" if len(adv_problems) > 3 else ""))

    # 4. the defense and its weights ------------------------------------------------------
    try:
        defense, _name, notes = build_entry_defense(entry, device=device, log=log,
                                                    use_snapshot=use_snapshot)
    except Exception as exc:  # noqa: BLE001 - a defense that no longer builds is a stale entry
        rep.add("weights", False, f"the defense cannot be rebuilt with its recorded weights "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}): stale entry")
        store.close()
        return rep
    defense.to(device).eval()
    if entry["defense"]["source"].get("kind") != "registry":
        changed = bool(notes.get("source_changed"))
        src_path = entry["defense"]["source"].get("path")
        rep.add("source", not changed,
                "the source file has the recorded sha256 (checked before importing it)"
                if not changed else
                f"the source {src_path} is not the submitted file (sha256 "
                f"{str(notes.get('source_sha256'))[:12]}, the entry records "
                f"{str(entry['defense']['source'].get('sha256'))[:12]}): it was not imported; "
                "the snapshot taken at submission was checked instead (stale entry)",
                source_changed=changed)
    fp = defense.fingerprint() if hasattr(defense, "fingerprint") else ""
    want = prov.get("checkpoint_sha256")
    note = (" (of the snapshot taken at submission)" if notes.get("used_snapshot") else "")
    rep.add("weights", fp == want, f"checkpoint sha256 {fp[:12]} matches{note}" if fp == want else
            f"checkpoint sha256 is {fp[:12]}, the entry records {str(want)[:12]}: the defense's "
            f"weights changed since submission (stale entry){note}", source_changed=bool(
                notes.get("source_changed")))

    want_cfg = entry["defense"].get("config")
    if want_cfg is not None:
        got_cfg = json.loads(json.dumps(defense.config() if hasattr(defense, "config") else {},
                                        default=str))
        rep.add("config", got_cfg == want_cfg, "the defense's config() is the recorded one"
                if got_cfg == want_cfg else f"the defense's config() is now {got_cfg}, the entry "
                f"records {want_cfg}: the defense changed since submission (stale entry)")

    # 5. the data -------------------------------------------------------------------------
    ds_opts = {k: v for k, v in (prov.get("dataset_options") or {}).items()
               if k in ("root", "source", "resolution", "split")}
    data = load_eval(entry["dataset"], entry["n"], seed=prov.get("seed", 0), **ds_opts)
    ids_ok = list(data.sample_ids) == list(prov.get("sample_ids") or [])
    want_pixels = prov.get("pixels_sha256")  # entries written before pixel hashes have none
    pixels_ok = want_pixels is None or data.pixel_sha256 == want_pixels
    rep.add("data", ids_ok and pixels_ok,
            (f"the {len(data)} evaluation images are the recorded ones"
             + (" (sample ids and pixel sha256)" if want_pixels else " (sample ids)"))
            if ids_ok and pixels_ok else
            "the evaluation images differ from the recorded sample ids" if not ids_ok else
            f"the evaluation images have pixel sha256 {data.pixel_sha256[:12]}, the entry records "
            f"{str(want_pixels)[:12]}: the data (or its decoded cache) changed since submission")
    x_all, y_all = data.images.to(device), data.labels.to(device)
    draws = int(prov.get("random_draws") or 5)
    cfg_seed = int(prov.get("seed") or 0)
    bs = int(prov.get("batch_size") or 100)

    # 6. re-score the stored adversarials --------------------------------------------------
    clean = score(defense, x_all, y_all, draws=draws, seed=cfg_seed)
    clean_ok = (clean.correct & ~clean.flagged).cpu()
    robust = clean_ok.clone()
    per_attack: dict[str, Any] = {}
    agree = total = 0
    plans: list[tuple[str, int, Any]] = []
    for label, a in entry["attacks"].items():
        rows = store.samples(a["cell_key"])
        idx_all = torch.tensor([r["idx"] for r in rows], dtype=torch.long)
        stored_robust = {r["idx"]: bool(r["robust"]) for r in rows}
        a_robust = torch.zeros(len(y_all), dtype=torch.bool)
        for b in a["batches"]:
            idx = idx_all[b["batch"] * bs:(b["batch"] + 1) * bs]
            try:
                adv = load_adv(run_dir, b["path"], b["sha256"]).to(device)
            except (ValueError, OSError, FileNotFoundError):
                continue  # reported by the adversarials check
            if len(adv) != len(idx):
                adv_problems.append(f"{label} batch {b['batch']}: {len(adv)} tensors for "
                                    f"{len(idx)} samples")
                continue
            s = score(defense, adv, y_all[idx.to(device)], draws=draws, seed=cfg_seed + b["batch"])
            ok = clean_ok[idx] & (s.correct | s.flagged).cpu()
            a_robust[idx] = ok
            robust[idx] &= ok
            for i, v in zip(idx.tolist(), ok.tolist()):
                agree += int(stored_robust.get(i) == v)
                total += 1
            plans.append((label, b["batch"], idx))
        per_attack[label] = Accuracy(int(a_robust.sum()), len(y_all)).as_dict()
    rescored = {"clean": Accuracy(int(clean_ok.sum()), len(y_all)).as_dict(),
                "worst_case": Accuracy(int(robust.sum()), len(y_all)).as_dict(),
                **{f"attack {a}": v for a, v in per_attack.items()}}
    outside = [f"{k}: re-scored {100 * v['accuracy']:.1f}% outside the entry's "
               f"[{100 * accs[k]['ci_low']:.1f}, {100 * accs[k]['ci_high']:.1f}]"
               for k, v in rescored.items() if k in accs and not _within(v["accuracy"], accs[k])]
    rep.add("rescore", not outside and total > 0,
            (f"re-scored worst case {100 * rescored['worst_case']['accuracy']:.1f}% (entry "
             f"{100 * entry['worst_case']['accuracy']:.1f}%, 95% CI "
             f"[{100 * entry['worst_case']['ci_low']:.1f}, "
             f"{100 * entry['worst_case']['ci_high']:.1f}]); "
             f"per-sample agreement {agree}/{total}") if not outside and total else
            ("; ".join(outside) if outside else "no stored adversarials could be re-scored"),
            rescored=rescored, agreement=agree, compared=total)

    # 7. re-run a random sample of batches ------------------------------------------------
    rng = pyrandom.Random(seed)
    chosen = rng.sample(plans, min(rerun, len(plans))) if rerun > 0 else []
    rerun_lines, rerun_ok = [], True
    clean_scored = Scored(clean.pred, clean.correct, clean.flagged)
    for label, b, idx in chosen:
        a = entry["attacks"][label]
        try:
            attack = create_attack(ComponentSpec(a["attack"], dict(a.get("options") or {}), label),
                                   entry["threat"], seed=cfg_seed)
        except Exception as exc:  # noqa: BLE001
            rerun_lines.append(f"{label} batch {b}: cannot rebuild the attack ({exc})")
            continue
        context = RunContext(dataset=entry["dataset"], dataset_options=ds_opts, device=device,
                             fit_preset=prov.get("fit_preset"), run_dir=str(run_dir),
                             defense=entry["defense"]["label"])
        d_idx = idx.to(device)
        cl = Scored(clean_scored.pred[d_idx], clean_scored.correct[d_idx],
                    clean_scored.flagged[d_idx])
        rows, adv, _ = attack_batch(defense, attack, x_all[d_idx], y_all[d_idx], entry["eps"],
                                    clean=cl, seed=cfg_seed + b, draws=draws, context=context)
        stored = {r["idx"]: bool(r["robust"]) for r in store.samples(a["cell_key"])}
        k_new = sum(int(r["robust"]) for r in rows)
        k_old = sum(int(stored[i]) for i in idx.tolist())
        same = sum(int(bool(r["robust"]) == stored[i]) for r, i in zip(rows, idx.tolist()))
        old = Accuracy(k_old, len(rows)).as_dict()
        inside = _within(k_new / len(rows), old)
        rerun_ok &= inside
        batch = next(x for x in a["batches"] if x["batch"] == b)
        try:
            bitwise = bool(torch.equal(adv.detach().cpu(), load_adv(run_dir, batch["path"])))
        except (OSError, ValueError, RuntimeError):
            bitwise = False
        rerun_lines.append(f"{label} batch {b}: re-run {k_new}/{len(rows)} robust vs stored "
                           f"{k_old}/{len(rows)} (95% CI [{100 * old['ci_low']:.0f}, "
                           f"{100 * old['ci_high']:.0f}]%), {same}/{len(rows)} samples agree"
                           f"{', identical adversarials' if bitwise else ''}")
    if chosen:
        rep.add("rerun", rerun_ok, "; ".join(rerun_lines))
    store.close()
    return rep
