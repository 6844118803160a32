"""Leaderboard entries: one JSON record per (defense, dataset, threat model, epsilon).

An entry is what a submission leaves behind and what every published format is rendered from.
It is self-describing and verifiable: it carries the numbers (with their counts, so the
intervals can be recomputed), the flags, the compute spent, and the provenance needed to
re-check it (``robustmatrix verify``) without re-running the attacks: the run directory, the
cell keys, and the sha256 of every stored batch of adversarial tensors.

Schema ``robustmatrix-entry-1`` (numbers stay numbers; accuracies are fractions in [0, 1])::

    schema            "robustmatrix-entry-1"
    entry_id          "<defense>/<dataset>/<threat>/<eps>" (also the file name, slugged)
    defense           {name, label, registry_name, authors, paper, architecture, extra_data,
                       notes, source: {kind: file|registry|entry_point, spec, path, class,
                       sha256, snapshot}, options, structure}
    dataset, threat, eps, n
    clean             {accuracy, ci_low, ci_high, k, n}                     (Wilson 95%)
    attacks           {label: {accuracy, ci_low, ci_high, k, n, complete, n_attacked,
                       attack, options, cell_key, adv_sha256, batches: [{batch, path, sha256}]}}
    worst_case        {accuracy, ci_low, ci_high, k, n}   per-sample AND over every attack
    flags             [{code, title, seen, try, attacks?, source?}]   cell + contract flags
    checklist         [{check, short, title, status (pass|fail|n/a), seen}]  the per-row
                       evaluation checklist (leaderboard/checklist.py, docs/checklist.md)
    validation        the contract-check report (bench/harness/validate.py)
    cost              {forward_passes, backward_passes, attack_wall_time, total_wall_time,
                       fit_seconds}
    provenance        {code_version, packages, python, platform, device, date, seed,
                       config_hash, config, checkpoint_sha256, artifact, artifact_sha256,
                       data_fingerprint, sample_ids, sample_ids_sha256, run_dir,
                       run_dir_relative, clean_cell_key, batch_size, random_draws}
    sweep             optional {attack, points: [{eps, clean, worst_case}]}
    figures           optional [{title, path}] (paths relative to the entry file)
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

from bench.core.hashing import json_sha256
from leaderboard.checklist import build_checklist, compact
from leaderboard.table import _eps_label, _fmt, build_records, rank, wilson_interval

SCHEMA = "robustmatrix-entry-1"
REQUIRED = ("schema", "entry_id", "defense", "dataset", "threat", "eps", "n", "clean",
            "attacks", "worst_case", "flags", "cost", "provenance")


class EntryError(ValueError):
    """A malformed or unreadable entry file (one-line message naming the file and the fix)."""


def slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", str(text)).strip("_").lower()
    return s or "defense"


def eps_slug(threat: str, eps: float) -> str:
    if threat == "linf" and abs(eps * 255 - round(eps * 255)) < 1e-6:
        return f"{round(eps * 255)}-255"
    return f"{eps:.4g}".replace(".", "p")


def entry_filename(entry: dict[str, Any]) -> str:
    return (f"{slug(entry['defense']['label'])}__{slug(entry['dataset'])}__{entry['threat']}__"
            f"{eps_slug(entry['threat'], entry['eps'])}.json")


# building entries from a run -----------------------------------------------------------------
def _sha256_json(obj: Any) -> str:
    return json_sha256(obj)


def build_entries(store: Any, cells: list, *, metadata: dict[str, Any], run_dir: Path,
                  sample_ids: list[str], extra_flags: list[dict] | None = None,
                  validation: dict | None = None, cost_extra: dict | None = None,
                  config: dict | None = None,
                  configured: list[str] | None = None) -> list[dict[str, Any]]:
    """Entries for the given finished cells of ONE defense (a clean cell plus attack cells).

    ``metadata`` is the ``defense`` block (name, authors, paper, ...); ``configured`` the labels
    of the configured attacks (the others were added by the runner: marked ``adaptive``).
    Returns one entry per (dataset, threat, eps) present among the attack cells.
    """
    by_key = {c.key: c for c in cells}
    clean = [c for c in cells if c.attack == "clean"]
    if not clean:
        raise EntryError("no finished clean cell among the submission's cells; the run did not "
                         "complete: run the same command again to resume it")
    records = build_records(store, by_key)
    entries = []
    for rec in records:
        attack_cells = [c for c in cells if c.attack != "clean" and c.dataset == rec["dataset"]
                        and c.threat == rec["threat"] and math.isclose(c.eps, rec["eps"],
                                                                       abs_tol=1e-9)]
        clean_cell = next(c for c in clean if c.dataset == rec["dataset"])
        prov = dict(clean_cell.provenance)
        attacks: dict[str, Any] = {}
        for label, acc in rec["attacks"].items():
            cs = [c for c in attack_cells if c.attack == label]
            c = cs[-1]
            attacks[label] = {**acc, "attack": c.spec.get("attack"),
                              "options": c.spec.get("attack_options", {}),
                              "config": c.spec.get("attack_config"), "cell_key": c.key,
                              "adv_sha256": c.adv_sha256, "wall_time": c.wall_time,
                              "forward_passes": c.forward_passes,
                              "backward_passes": c.backward_passes,
                              "adaptive": configured is not None and label not in configured,
                              "batches": [{"batch": b["batch"], "path": b["adv_path"],
                                           "sha256": b["adv_sha256"]}
                                          for b in store.batches(c.key)]}
        spec = clean_cell.spec
        row_flags = list(extra_flags or []) + rec["flags"]
        entry_checks = _suite_records(store, attack_cells)
        entry_checks += _row_records(cells, rec, prov.get("structure") or {})
        entry = {
            "schema": SCHEMA,
            "entry_id": f"{metadata['label']}/{rec['dataset']}/{rec['threat']}/{rec['eps']:.6g}",
            "defense": {**metadata, "structure": prov.get("structure", {})},
            "dataset": rec["dataset"], "threat": rec["threat"], "eps": rec["eps"], "n": rec["n"],
            "clean": rec["clean"], "attacks": attacks, "worst_case": rec["worst_case"],
            "flags": row_flags,
            "checklist": build_checklist(row_flags, entry_checks) if entry_checks else [],
            "detector_fpr": rec.get("detector_fpr"),
            "validation": validation or {},
            "cost": {"forward_passes": rec["cost"]["forward_passes"],
                     "backward_passes": rec["cost"]["backward_passes"],
                     "attack_wall_time": rec["cost"]["wall_time"], **(cost_extra or {})},
            "provenance": {
                **{k: prov.get(k) for k in ("code_version", "packages", "python", "platform",
                                            "device", "date", "config_hash",
                                            "checkpoint_sha256", "sample_ids_sha256",
                                            "pixels_sha256")},
                "artifact": (prov.get("artifact") or {}).get("artifact"),
                "artifact_sha256": (prov.get("artifact") or {}).get("artifact_sha256"),
                "seed": spec.get("seed"), "batch_size": spec.get("batch_size"),
                "random_draws": spec.get("random_draws"), "fit_preset": spec.get("fit_preset"),
                "data_fingerprint": spec.get("data"), "dataset_options": spec.get(
                    "dataset_options", {}), "defense_registry_name": spec.get("defense"),
                "defense_options": spec.get("defense_options", {}),
                "clean_cell_key": clean_cell.key, "sample_ids": list(sample_ids),
                "run_dir": str(run_dir), "config": config or {},
            },
        }
        entry["provenance"]["entry_sha256"] = entry_digest(entry)
        entries.append(entry)
    return entries


def store_checklists(store: Any) -> list[dict[str, Any]]:
    """The checklist of every row of a run's store (what an entry of that row would carry):
    ``{dataset, defense, threat, eps, checklist}``, in the leaderboard's order."""
    current = store.current_keys()
    cells = [c for c in store.cells("done") if c.key in current]
    out = []
    for rec in build_records(store):
        mine = [c for c in cells if c.defense == rec["defense"] and c.dataset == rec["dataset"]]
        attack_cells = [c for c in mine if c.attack != "clean" and c.threat == rec["threat"]
                        and math.isclose(c.eps, rec["eps"], abs_tol=1e-9)]
        clean = next((c for c in mine if c.attack == "clean"), None)
        structure = ((clean.provenance or {}).get("structure") or {}) if clean else {}
        recs = _suite_records(store, attack_cells) + _row_records(mine, rec, structure)
        out.append({k: rec[k] for k in ("dataset", "defense", "threat", "eps")} |
                   {"checklist": build_checklist(rec["flags"], recs)})
    return out


def _suite_records(store: Any, attack_cells: list) -> list[dict]:
    """The attack cells' check records (``attack`` added); the single-step and gradient-free
    comparisons are re-judged against the row's worst case (a point some other attack of the
    suite broke is not a miss of the suite)."""
    robust: dict[int, bool] = {}
    for c in attack_cells:
        for r in store.samples(c.key):
            robust[r["idx"]] = robust.get(r["idx"], True) and bool(r["robust"])
    out = []
    for c in attack_cells:
        for r in (c.metrics or {}).get("checks", []):
            r = {**r, "attack": c.attack}
            if r.get("idx") is not None and r.get("broken") is not None and \
                    r["status"] in ("pass", "fail"):
                only = sum(1 for i, b in zip(r["idx"], r["broken"]) if b and robust.get(i, False))
                r["status"] = "fail" if only else "pass"
                r["seen"] = (f"{r.get('name', 'the other attack')} broke {sum(r['broken'])}/"
                             f"{len(r['broken'])} points, {only} of them robust in the row's "
                             "worst case")
            out.append(r)
    return out


def _row_records(cells: list, rec: dict, structure: dict) -> list[dict]:
    """Check records only visible across a defense's cells: the epsilon sweep (applies when
    several eps of this threat were run) and the detector plausibility (detectors with anchors)."""
    from bench.core.anchors import reference_accuracy

    eps = {round(float(c.eps), 8) for c in cells if c.attack != "clean"
           and c.dataset == rec["dataset"] and c.threat == rec["threat"]}
    out = [{"code": "eps_sweep", "status": "pass" if len(eps) > 1 else "n/a",
            "seen": (f"{len(eps)} epsilons run, robust accuracy does not rise" if len(eps) > 1
                     else "one epsilon run")}]
    ref = reference_accuracy(rec["dataset"], rec["threat"], rec["eps"] / 2)
    if structure.get("has_detector"):
        out.append({"code": "detector_plausibility", "status": "pass" if ref is not None
                    else "n/a", "seen": (f"below the best known classifier at eps/2 ({ref:.1%})"
                                         if ref is not None else "no reference anchors for "
                                         f"{rec['dataset']} {rec['threat']}")})
    else:
        out.append({"code": "detector_plausibility", "status": "n/a", "seen": "no detector"})
    return out


def entry_digest(entry: dict[str, Any]) -> str:
    """sha256 over the scored content (numbers, flags, tensors), not over later additions such
    as a sweep or figures; ``verify`` recomputes it to detect a hand-edited file."""
    core = {k: entry.get(k) for k in ("entry_id", "dataset", "threat", "eps", "n", "clean",
                                      "attacks", "worst_case")}
    core["checkpoint"] = entry.get("provenance", {}).get("checkpoint_sha256")
    return _sha256_json(core)


# reading and writing -------------------------------------------------------------------------
def write_entry(entry: dict[str, Any], folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entry = {k: v for k, v in entry.items() if not k.startswith("_")}
    prov = entry.setdefault("provenance", {})
    if prov.get("run_dir"):
        prov["run_dir_relative"] = os.path.relpath(Path(prov["run_dir"]).resolve(),
                                                   folder.resolve())
    path = folder / entry_filename(entry)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry, indent=2, default=str, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


#: the largest entry file read (an entry is tens of kB)
MAX_ENTRY_BYTES = 64 << 20


def _read_entry_text(path: Path) -> str:
    """An entry file's text: a regular file of at most :data:`MAX_ENTRY_BYTES` (a FIFO or a
    device named as an entry is refused before it is opened)."""
    import stat

    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise EntryError(f"{path} is not a regular file; give an entry JSON file")
    if st.st_size > MAX_ENTRY_BYTES:
        raise EntryError(f"{path} is {st.st_size} bytes, too large for an entry; give an entry "
                         "JSON file written by `robustmatrix submit`")
    with open(path, "rb") as f:
        return f.read(MAX_ENTRY_BYTES + 1).decode("utf-8")


def read_entry(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise EntryError(f"no entry file {path}; give the path of a JSON file written by "
                         "`robustmatrix submit` (in <run-dir>/entries/)")
    if path.is_dir():
        found = sorted(path.glob("*.json")) if path.name == "entries" else sorted(
            path.glob("entries/*.json"))
        hint = f", e.g. {found[0]}" if found else " (<run-dir>/entries/*.json)"
        raise EntryError(f"{path} is a folder; give the entry JSON file(s) inside it{hint}")
    try:
        entry = json.loads(_read_entry_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EntryError(f"{path} is not valid JSON ({exc}); restore it from the run "
                         "(`robustmatrix submit` writes it again without recomputing)") from None
    check_entry(entry, path)
    return entry


def check_entry(entry: Any, where: Any = "entry") -> None:
    if not isinstance(entry, dict) or entry.get("schema") != SCHEMA:
        raise EntryError(f"{where} is not a robustmatrix entry (schema {SCHEMA!r} expected)")
    missing = [k for k in REQUIRED if k not in entry]
    if missing:
        raise EntryError(f"{where} lacks the field(s) {', '.join(missing)}; write entries with "
                         "`robustmatrix submit`")
    for key in ("clean", "worst_case"):
        acc = entry[key]
        if not isinstance(acc, dict) or not {"accuracy", "k", "n"} <= set(acc):
            raise EntryError(f"{where}: '{key}' must hold accuracy, k and n")


def load_entries(*locations: str | os.PathLike) -> list[dict[str, Any]]:
    """Every entry under the given files or folders (searched recursively; JSON files that are
    not entries, e.g. a run's config.json, are skipped). Sorted by entry id; each carries its
    file path under ``_path``."""
    files: list[Path] = []
    for loc in locations:
        p = Path(loc)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(sorted(p.rglob("*.json")))
        else:
            raise EntryError(f"no entries folder or file {p}; pass the folder that "
                             "`robustmatrix submit` wrote (<run-dir>/entries)")
    entries = []
    for f in files:
        try:
            raw = json.loads(_read_entry_text(f))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            raise EntryError(f"{f} is not valid JSON ({exc}); fix or remove it") from None
        if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
            continue
        check_entry(raw, f)
        raw["_path"] = str(f)
        entries.append(raw)
    seen: dict[str, str] = {}
    for e in entries:
        if e["entry_id"] in seen:
            raise EntryError(f"two entries have the id {e['entry_id']!r} ({seen[e['entry_id']]} "
                             f"and {e['_path']}); keep one or give one a different --name")
        seen[e["entry_id"]] = e["_path"]
    return sorted(entries, key=lambda e: e["entry_id"])


# tables --------------------------------------------------------------------------------------
def board_key(entry: dict[str, Any]) -> tuple[str, str, float]:
    return (entry["dataset"], entry["threat"], round(float(entry["eps"]), 8))


def board_title(dataset: str, threat: str, eps: float) -> str:
    return f"{dataset} | {_eps_label(threat, eps)}"


def group_boards(entries: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Entries per (dataset, threat, eps), each list ranked by worst case then clean."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault(board_key(e), []).append(e)
    return {k: sorted(v, key=lambda e: (-e["worst_case"]["accuracy"], -e["clean"]["accuracy"],
                                        e["defense"]["label"]))
            for k, v in sorted(groups.items())}


def attack_columns(entries: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(a for e in entries for a in e["attacks"]))


def entries_tables(entries: list[dict[str, Any]], *, per_attack: bool = True,
                   show_cost: bool = False, metadata: bool = True) -> dict[str, pd.DataFrame]:
    """Display tables (strings made here only), keyed by board title, same layout as
    :func:`leaderboard.table.build_tables` plus the submission's metadata columns."""
    tables = {}
    for (dataset, threat, eps), rs in group_boards(entries).items():
        attacks = attack_columns(rs)
        rows = []
        for rk, e in zip(rank(rs), rs):
            d = e["defense"]
            row: dict[str, Any] = {"Rank": rk, "Defense": d["label"]}
            if metadata:
                row["Architecture"] = d.get("architecture") or ""
                row["Extra data"] = "yes" if d.get("extra_data") else "no"
            row["Clean %"] = _fmt(e["clean"])
            if per_attack:
                for a in attacks:
                    acc = e["attacks"].get(a)
                    row[f"{a} %"] = ("n/a" if acc is None
                                     else _fmt(acc) if acc.get("complete", True)
                                     else f"({acc['n_attacked']} attacked)")
            row["Worst case %"] = _fmt(e["worst_case"])
            if show_cost:
                row["Fwd passes"] = e["cost"].get("forward_passes", 0)
                row["Bwd passes"] = e["cost"].get("backward_passes", 0)
                row["Wall s"] = round(e["cost"].get("total_wall_time",
                                                    e["cost"].get("attack_wall_time", 0.0)), 1)
            row["Flags"] = ", ".join(dict.fromkeys(f["code"] for f in e["flags"])) or "-"
            if any(x.get("checklist") for x in rs):
                row["Checklist"] = compact(e.get("checklist"))
            rows.append(row)
        tables[board_title(dataset, threat, eps)] = pd.DataFrame(rows)
    return tables


def consistent_accuracy(acc: dict[str, Any], tol: float = 1e-9) -> bool:
    """True when an accuracy dict agrees with its own counts (value and Wilson interval)."""
    n, k = acc.get("n", 0), acc.get("k", 0)
    if not n:
        return True
    lo, hi = wilson_interval(k, n)
    return (abs(acc["accuracy"] - k / n) <= tol and abs(acc.get("ci_low", lo) - lo) <= tol
            and abs(acc.get("ci_high", hi) - hi) <= tol)


# deterministic sample entries (tests, template previews) -------------------------------------
def sample_entries() -> list[dict[str, Any]]:
    """Four made-up but well-formed entries (three defenses on one board, one on another) with
    flags, a sweep and full provenance fields: the golden-file tests and the HTML test render
    these, and they preview the templates without running anything."""
    from leaderboard.table import Accuracy

    def acc(k: int, n: int = 50, **extra: Any) -> dict[str, Any]:
        return {**Accuracy(k, n).as_dict(), **extra}

    def flag(code: str, title: str, seen: str, try_: str, **extra: Any) -> dict[str, Any]:
        return {"code": code, "title": title, "seen": seen, "try": try_, **extra}

    def entry(label: str, threat: str, eps: float, clean: int, attacks: dict[str, int],
              flags: list, *, arch: str, extra_data: bool = False, paper: str = "",
              authors: str = "", sweep: list[tuple[float, int]] | None = None) -> dict[str, Any]:
        worst = min(attacks.values()) - (1 if len(attacks) > 1 and min(attacks.values()) > 0 else 0)
        e: dict[str, Any] = {
            "schema": SCHEMA, "entry_id": f"{label}/test_tiny/{threat}/{eps:.6g}",
            "defense": {"name": label, "label": label, "registry_name": slug(label),
                        "authors": authors, "paper": paper, "architecture": arch,
                        "extra_data": extra_data, "notes": "",
                        "source": {"kind": "file", "spec": f"{slug(label)}.py:Defense",
                                   "class": "Defense", "sha256": "ab" * 32},
                        "structure": {"has_preprocessor": label.startswith("Bit"),
                                      "preprocessor_differentiable": False, "random": False,
                                      "has_detector": False, "trainable": True}},
            "dataset": "test_tiny", "threat": threat, "eps": eps, "n": 50,
            "clean": acc(clean),
            "attacks": {a: acc(k, complete=True, n_attacked=50, attack=a, options={},
                               cell_key=f"{slug(label)}-{slug(a)}", adv_sha256="cd" * 32,
                               forward_passes=500, backward_passes=400,
                               adaptive=a.startswith("bpda"),
                               batches=[{"batch": 0, "path": "adv/x/00000.safetensors",
                                         "sha256": "ef" * 32}])
                        for a, k in attacks.items()},
            "worst_case": acc(worst), "flags": flags,
            "validation": {"passed": True, "findings": []},
            "cost": {"forward_passes": 500 * len(attacks), "backward_passes": 400 * len(attacks),
                     "attack_wall_time": 3.5, "total_wall_time": 12.25, "fit_seconds": 4.0},
            "provenance": {"code_version": "v0.1.0-test", "packages": {"torch": "2.x"},
                           "device": "cpu", "date": "2026-01-01T00:00:00Z",
                           "config_hash": "12" * 32, "checkpoint_sha256": "34" * 32,
                           "sample_ids_sha256": "56" * 32, "seed": 0, "batch_size": 50,
                           "random_draws": 5, "data_fingerprint": "78" * 32,
                           "sample_ids": [f"test_tiny/test/{i % 10}/{i:04d}" for i in range(50)],
                           "run_dir": "runs/example", "clean_cell_key": f"{slug(label)}-clean"},
        }
        if sweep:
            e["sweep"] = {"attack": "pgd", "threat": threat, "points": [
                {"eps": x, "clean": acc(clean), "robust": acc(k), "worst_case": acc(k)}
                for x, k in sweep]}
        e["provenance"]["entry_sha256"] = entry_digest(e)
        return e

    grad = flag("zero_gradients", "Zero, NaN or missing input gradients",
                "16/16 samples have zero or NaN input gradients", "use BPDA or a black-box attack",
                attacks=["pgd"])
    silent = flag("silent_success", "Attack did not return its best iterate",
                  "3 samples had an adversarial intermediate iterate", "return the best iterate",
                  attacks=["pgd"])
    e8 = 8 / 255
    return [
        entry("Bit-depth CNN", "linf", e8, 46, {"pgd": 44, "bpda+pgd": 12}, [grad],
              arch="SmallCNN", authors="A. User", paper="https://example.org/bitdepth",
              sweep=[(0.0, 46), (2 / 255, 35), (4 / 255, 24), (8 / 255, 11), (16 / 255, 2)]),
        entry("Adv. trained CNN", "linf", e8, 40, {"pgd": 24, "bpda+pgd": 24}, [],
              arch="SmallCNN", extra_data=True, authors="B. Author & C. Author",
              sweep=[(0.0, 40), (2 / 255, 35), (4 / 255, 30), (8 / 255, 23), (16 / 255, 12)]),
        entry("Undefended_100%", "linf", e8, 49, {"pgd": 1, "bpda+pgd": 1}, [silent],
              arch="ResNet-20"),
        entry("Adv. trained CNN", "l2", 0.5, 40, {"pgd": 30}, [], arch="SmallCNN"),
    ]
