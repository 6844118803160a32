"""Submitting a defense: evaluate a user's defense in one call and write its entries.

The steps, each a small function (STYLE.md):

1. :func:`bench.harness.submission.load.load_submission` imports the defense (a file, a module
   or a registry name) and :func:`~bench.harness.submission.load.register_submission` registers
   it under a content-addressed name (``<label>@<sha256 of the file, 8 hex>``).
2. :func:`bench.artifacts.prepare_defense` builds it and fits its trainable parts (cached).
3. :func:`bench.harness.validate.validate_or_raise` runs the contract checks: a broken contract is
   refused (or, with ``force``, stored as flags) before any attack runs.
4. :func:`bench.harness.submission.suites.submission_config` generates a
   :class:`~bench.core.config.BenchmarkConfig` (the attack suite, plus what the defense's
   declared structure calls for) and :class:`~bench.harness.runner.MatrixRunner` runs it
   (resumable; adaptive cells come from the runner).
5. :func:`leaderboard.entries.build_entries` turns the finished cells into entries, written to
   ``<run-dir>/entries/*.json`` with the weights and source snapshotted in the run directory.

``robustmatrix sweep`` is :mod:`bench.harness.submission.sweep`; the command line is
:mod:`bench.cli.submit`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness.submission.load import (
    SubmitError,
    load_submission,
    register_submission,
    slug,
    snapshot,
)
from bench.harness.submission.suites import (
    Metadata,
    SubmitOptions,
    submission_config,
    suite_attacks,
)


@dataclass
class SubmitResult:
    entries: list[Path]
    run_dir: Path
    registry_name: str
    validation: Any
    wall_time: float


# 4. the whole submission ---------------------------------------------------------------------
def _probe(data, n: int = 32):
    import torch

    idx = torch.linspace(0, len(data) - 1, min(n, len(data))).round().long().unique()
    return data.images[idx], data.labels[idx]


def _matching_cells(store, cfg, registry_name: str, fingerprint: str, data_fp: str,
                    pixels: str | None = None) -> list:
    """This submission's finished cells: its defense (name and weights), data and seed; attack
    cells for the configured threats/epsilons, with the configured options for suite labels
    (a label re-used with other options in an earlier run of the same folder is left out)."""
    wanted = {(t, round(float(e), 8)) for t, es in cfg.threat_models.items() for e in es}
    by_label = {a.label: a for a in cfg.attacks}
    out = []
    for c in store.cells("done"):
        s = c.spec
        if (s.get("defense") != registry_name or s.get("defense_sha256") != fingerprint
                or s.get("data") != data_fp or s.get("seed") != cfg.seed
                or s.get("pixels") not in (None, pixels)):  # None: stored before pixel hashes
            continue
        if c.attack == "clean":
            out.append(c)
            continue
        if (c.threat, round(float(c.eps), 8)) not in wanted:
            continue
        a = by_label.get(c.attack)
        if a is not None and (s.get("attack") != a.name or s.get("attack_options") != a.options):
            continue
        out.append(c)
    return out


def _resolve_threats(opts: SubmitOptions) -> dict[str, list[float]]:
    from bench.data import dataset_info

    info = dataset_info(opts.dataset)
    out = {}
    for t, eps in opts.threats.items():
        eps = list(eps) or ([info.default_eps[t]] if t in info.default_eps else [])
        if not eps:
            raise SubmitError(f"{opts.dataset} has no default epsilon for {t}; give one, e.g. "
                              f"--threat {t}=0.5")
        out[t] = eps
    return out


def submit(spec: str, meta: Metadata, opts: SubmitOptions, *,
           log: Callable[[str], None] = print) -> SubmitResult:
    """Validate, evaluate and write the entries of one defense (see the module docstring)."""
    from bench.artifacts import prepare_defense, resolve_device
    from bench.core.config import config_from_dict
    from bench.data import dataset_info, load_eval
    from bench.harness.runner import MatrixRunner
    from bench.harness.validate import ValidationError, validate_defense
    from leaderboard.entries import build_entries, write_entry

    t0 = time.perf_counter()
    for f in opts.figures:
        if not Path(f).is_file():
            raise SubmitError(f"--figure {f}: no such file; give a PNG or SVG the defense wrote")
    obj, source = load_submission(spec)
    label = meta.name or source.get("class") or source.get("name") or "defense"
    registry_name = register_submission(obj, source, label)
    opts.threats = _resolve_threats(opts)
    run_dir = Path(opts.run_dir or f"runs/submissions/{slug(label)}").expanduser().resolve()
    entries_dir = Path(opts.entries_dir).expanduser() if opts.entries_dir else run_dir / "entries"
    device = resolve_device(opts.device)
    ds_opts = {"root": opts.data_root} if opts.data_root else {}

    log(f"building {label} ({registry_name}) on {opts.dataset}")
    defense, info = prepare_defense(registry_name, dict(opts.options), dataset=opts.dataset,
                                    dataset_options=ds_opts, device=device,
                                    preset=opts.fit_preset, progress=opts.progress, log=log)
    data = load_eval(opts.dataset, int(opts.n), seed=opts.seed, **ds_opts)
    x, y = _probe(data)
    report = validate_defense(defense, x.to(device), y.to(device),
                              num_classes=dataset_info(opts.dataset).num_classes, seed=opts.seed)
    log(report.format())
    refusal = report.refusal(forced=opts.force)
    if refusal:
        raise ValidationError(refusal, report)
    attacks = ([a if isinstance(a, dict) else {"name": a} for a in opts.attacks] if opts.attacks
               else suite_attacks(opts.suite))
    raw = submission_config(registry_name, label, opts, attacks, run_dir)
    cfg = config_from_dict(raw, source="submission")
    defense_config = json.loads(json.dumps(defense.config() if hasattr(defense, "config")
                                           else {}, default=str))
    del defense  # the runner builds its own (from the cached artifact)

    runner = MatrixRunner(cfg, progress=opts.progress, log=log, run_dir=run_dir)
    n_eps = sum(map(len, cfg.threat_models.values()))
    log(f"evaluating {label}: {len(cfg.attacks)} attack(s) x {n_eps} "
        f"epsilon(s) on {cfg.datasets[0].n} {opts.dataset} images ({runner.device}); results in "
        f"{run_dir}")
    summary = runner.run()
    if summary.errors:
        raise SubmitError(f"the evaluation reported errors: {summary.errors[0]}")
    fingerprint = _runner_fingerprint(runner.store, registry_name)
    cells = _matching_cells(runner.store, cfg, registry_name, fingerprint, data.fingerprint,
                            data.pixel_sha256)

    source["snapshot"] = _rel(snapshot(Path(source["path"]) if source.get("path") else None,
                                       run_dir / "source"), run_dir)
    artifact = _rel(snapshot(Path(info["artifact"]) if info.get("artifact") else None,
                             run_dir / "artifacts"), run_dir)
    figures = [(Path(f).stem, snapshot(Path(f), entries_dir / "figures"))
               for f in list(opts.figures) or provided_figures(source)]
    metadata = {"name": label, "label": label, "registry_name": registry_name,
                "authors": meta.authors, "paper": meta.paper, "architecture": meta.architecture,
                "extra_data": bool(meta.extra_data), "notes": meta.notes, "source": source,
                "options": dict(opts.options), "artifact_snapshot": artifact,
                "config": defense_config}
    wall = time.perf_counter() - t0
    entries = build_entries(
        runner.store, cells, metadata=metadata, run_dir=run_dir, sample_ids=data.sample_ids,
        extra_flags=report.flags(forced=opts.force), validation=report.as_dict(),
        cost_extra={"total_wall_time": wall, "fit_seconds": info.get("fit_seconds", 0.0)},
        config=cfg.to_dict(), configured=[a.label for a in cfg.attacks])
    paths = []
    for e in entries:
        e["figures"] = [{"title": title, "path": os.path.relpath(
            Path(f).resolve(), entries_dir.resolve())} for title, f in figures if f]
        paths.append(write_entry(e, entries_dir))
    return SubmitResult(paths, run_dir, registry_name, report, wall)


def provided_figures(source: dict[str, Any], fit_root: Path = Path("runs/fit")) -> list[Path]:
    """The t-SNE figures a registered defense wrote with ``robustmatrix fit NAME --report``
    (``runs/fit/<name>/*tsne*``; PNG preferred over an SVG of the same figure)."""
    if source.get("kind") != "registry":
        return []
    folder = fit_root / source["name"]
    found: dict[str, Path] = {}
    for p in sorted(folder.glob("*tsne*")) if folder.is_dir() else []:
        if p.suffix.lower() in (".png", ".svg") and (p.stem not in found or p.suffix == ".png"):
            found[p.stem] = p
    return list(found.values())


def _rel(path: str | None, run_dir: Path) -> str | None:
    """Snapshots are recorded relative to the run directory, so a run folder (with its entries)
    can be moved or archived and still be verified."""
    return None if path is None else str(Path(path).resolve().relative_to(run_dir.resolve()))


def _runner_fingerprint(store, registry_name: str) -> str:
    """The weights sha256 the runner recorded for this defense in its newest clean cell."""
    clean = [c for c in store.cells("done") if c.attack == "clean"
             and c.spec.get("defense") == registry_name]
    if not clean:
        raise SubmitError("the run finished without a clean cell for the defense; run the same "
                          "command again to resume it")
    return clean[-1].spec.get("defense_sha256", "")
