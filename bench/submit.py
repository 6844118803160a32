"""``robustmatrix submit``: evaluate a user's defense with one command and write its entries.

The steps, each a small function (STYLE.md):

1. :func:`load_submission` imports the defense from ``path/to/file.py:ClassName`` (any folder,
   inside the repository or not), a ``module:attr`` string, or a registry / entry-point name;
   :func:`register_submission` registers it in ``DEFENSES`` under a content-addressed name
   (``<label>@<sha256 of the file, 8 hex>``), so a changed file is a different defense.
2. :func:`bench.artifacts.prepare_defense` builds it and fits its trainable parts (cached).
3. :func:`bench.validate.validate_or_raise` runs the contract checks: a broken contract is
   refused (or, with ``force``, stored as flags) before any attack runs.
4. :func:`submission_config` generates a :class:`~bench.config.BenchmarkConfig` (the attack
   suite, plus what the defense's declared structure calls for) and
   :class:`~bench.runner.MatrixRunner` runs it (resumable; adaptive cells come from the runner).
5. :func:`leaderboard.entries.build_entries` turns the finished cells into entries, written to
   ``<run-dir>/entries/*.json`` with the weights and source snapshotted in the run directory.

:func:`run_sweep` runs one attack configuration over a grid of epsilons for an existing entry
(``robustmatrix sweep``), for the robust-accuracy-vs-epsilon plot.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.registry import DEFENSES, RegistryError

#: attack suites: what ``--suite`` runs against every submission. The runner adds the adaptive
#: forms the defense's declared structure calls for (BPDA, EOT, detector-aware, transfer, Square,
#: AutoAttack ``rand``; ``attacks/adaptive.py``) with the suite's ``adaptive`` options, and runs
#: the suite's optional reliability ``checks`` (``bench/flags.py``).
SUITES: dict[str, dict[str, Any]] = {
    # seconds on test_tiny; for the test-suite and trying the command out
    "test": {"attacks": [{"name": "test_pgd"}],
             "adaptive": {"square_queries": 50, "eot_draws": 2}, "checks": {}},
    # minutes on a CPU at n=100..500: PGD-20 and AutoAttack's CPU configuration
    "quick": {"attacks": [{"name": "pgd", "steps": 20, "label": "pgd20"},
                          {"name": "autoattack_cheap"}],
              "adaptive": {"square_queries": 1000},
              "checks": {"convergence_subset": 16, "large_eps_subset": 16}},
    # the reference evaluation (a GPU): PGD-50 and standard AutoAttack (APGD, FAB, Square)
    "standard": {"attacks": [{"name": "pgd", "steps": 50, "label": "pgd50"},
                             {"name": "autoattack"}],
                 "adaptive": {"square_queries": 5000, "eot_draws": 20},
                 "checks": {"convergence_subset": 64, "large_eps_subset": 64}},
}
SUBMISSION_ATTR = "__robustmatrix_submission__"


class SubmitError(ValueError):
    """A submission that cannot be loaded or run (one-line message naming the fix)."""


@dataclass
class SubmitOptions:
    dataset: str = "cifar10"
    threats: dict[str, list[float]] = field(default_factory=lambda: {"linf": []})
    n: int = 100
    suite: str = "quick"
    attacks: list[Any] | None = None   # replaces the suite when given
    seed: int = 0
    device: str = "auto"
    batch_size: int = 100
    random_draws: int = 5
    fit_preset: str = "quick"
    schedule: str = "full"
    run_dir: str | None = None
    entries_dir: str | None = None
    data_root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the defense's constructor options
    force: bool = False
    progress: bool = True
    figures: list[str] = field(default_factory=list)


@dataclass
class Metadata:
    name: str | None = None
    authors: str = ""
    paper: str = ""
    architecture: str = ""
    extra_data: bool = False
    notes: str = ""


@dataclass
class SubmitResult:
    entries: list[Path]
    run_dir: Path
    registry_name: str
    validation: Any
    wall_time: float


# 1. loading ----------------------------------------------------------------------------------
def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _import_file(path: Path) -> Any:
    """Import a Python file by path under a name derived from its content (a second import of
    the same content returns the same module, so the same class object)."""
    sha = _file_sha256(path)
    modname = f"robustmatrix_submission_{slug(path.stem)}_{sha[:12]}"
    if modname in sys.modules:
        return sys.modules[modname]
    folder = str(path.parent.resolve())
    if folder not in sys.path:
        sys.path.append(folder)  # the user's helper modules next to the file (never shadowing)
    spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise SubmitError(f"cannot import {path} as a Python module; give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[modname]
        raise SubmitError(f"importing {path} failed with {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}; run "
                          f"`python {path}` to see the full error") from exc
    return module


def slug(text: str) -> str:
    from leaderboard.entries import slug as _slug

    return _slug(text)


def _candidates(module: Any) -> list[str]:
    from torch import nn

    return [n for n, o in vars(module).items() if inspect.isclass(o) and issubclass(o, nn.Module)
            and o.__module__ == module.__name__ and not n.startswith("_")]


def _pick_class(module: Any, name: str | None, where: str) -> Any:
    from defenses.base import Defense

    if name:
        obj = getattr(module, name, None)
        if obj is None:
            cands = _candidates(module)
            close = difflib.get_close_matches(name, cands, n=1)
            hint = f"did you mean '{close[0]}'?" if close else (
                f"it defines: {', '.join(cands)}" if cands else "it defines no nn.Module class")
            raise SubmitError(f"{where} has no class '{name}'; {hint}")
        return obj
    defenses = [n for n in _candidates(module) if issubclass(getattr(module, n), Defense)]
    if len(defenses) == 1:
        return getattr(module, defenses[0])
    raise SubmitError(f"{where}: name the class to submit as {where}:ClassName "
                      f"(candidates: {', '.join(_candidates(module)) or 'none'})")


def load_submission(spec: str) -> tuple[Any, dict[str, Any]]:
    """The class or factory named by ``spec`` and a ``source`` record for provenance.

    ``spec`` is ``path/to/file.py[:ClassName]``, ``package.module:attr`` (an importable
    object, e.g. what an entry point names), or a registry name (built-in, or installed through
    the ``robustmatrix.defenses`` entry-point group).
    """
    head, sep, tail = spec.rpartition(":")
    if sep and head.endswith(".py") or spec.endswith(".py"):
        path = Path(head if sep and head.endswith(".py") else spec).expanduser()
        attr = tail if sep and head.endswith(".py") else ""
        if not path.is_file():
            raise SubmitError(f"no file {path}; give path/to/file.py:ClassName")
        module = _import_file(path)
        obj = _pick_class(module, attr or None, str(path))
        return obj, {"kind": "file", "spec": spec, "path": str(path.resolve()),
                     "class": obj.__name__, "sha256": _file_sha256(path)}
    if sep:
        try:
            module = importlib.import_module(head)
        except ImportError as exc:
            raise SubmitError(f"cannot import module '{head}' ({exc}); install the package "
                              "that provides it or give path/to/file.py:ClassName") from None
        obj = _pick_class(module, tail, head)
        file = getattr(module, "__file__", None)
        return obj, {"kind": "module", "spec": spec, "path": file, "class": tail,
                     "sha256": _file_sha256(Path(file)) if file else None}
    try:
        obj = DEFENSES.get(spec)
    except RegistryError as exc:
        raise SubmitError(f"{exc}; or give path/to/file.py:ClassName") from None
    file = inspect.getsourcefile(obj) if (inspect.isclass(obj) or inspect.isfunction(obj)) else None
    return obj, {"kind": "registry", "spec": spec, "name": spec, "path": file,
                 "class": getattr(obj, "__name__", spec),
                 "sha256": _file_sha256(Path(file)) if file else None}


class SubmittedModel:
    """Factory wrapping a plain ``nn.Module`` classifier into a :class:`Defense` (no declared
    preprocessor or detector; ``random`` read from the class attribute if present)."""

    def __init__(self, cls: Any) -> None:
        self.cls = cls
        self.__name__ = cls.__name__
        self.__doc__ = cls.__doc__

    def __call__(self, **kwargs: Any):
        from bench.artifacts import _accepts
        from bench.data import dataset_info
        from defenses.base import Defense

        model = self.cls(**{k: v for k, v in kwargs.items() if _accepts(self.cls, k)})
        num_classes = getattr(model, "num_classes", None)
        if num_classes is None and "dataset" in kwargs:
            num_classes = dataset_info(kwargs["dataset"]).num_classes
        wrapped = Defense(model, num_classes=num_classes)
        wrapped.random = bool(getattr(model, "random", False))
        return wrapped


def register_submission(obj: Any, source: dict[str, Any], label: str) -> str:
    """Register ``obj`` in ``DEFENSES``; returns the registry name used in the config."""
    from torch import nn

    from defenses.base import Defense

    if source["kind"] == "registry":
        return source["name"]
    name = f"{slug(label)}@{(source.get('sha256') or '0' * 8)[:8]}"
    if name in DEFENSES:
        existing = DEFENSES.get(name)
        if getattr(existing, SUBMISSION_ATTR, None) == source.get("sha256"):
            return name
        raise SubmitError(f"the name '{slug(label)}' is taken by another defense; choose another "
                          "--name")
    if inspect.isclass(obj) and issubclass(obj, nn.Module) and not issubclass(obj, Defense):
        factory: Any = SubmittedModel(obj)
    elif callable(obj):
        factory = obj
    else:
        raise SubmitError(f"{source['spec']} is a {type(obj).__name__}, not a class or factory; "
                          "name a Defense (or nn.Module) subclass")
    DEFENSES.register(name, factory)
    try:
        setattr(factory, SUBMISSION_ATTR, source.get("sha256"))
    except (AttributeError, TypeError):
        pass
    return name


# 3. the generated configuration --------------------------------------------------------------
def suite_attacks(suite: str) -> list[dict[str, Any]]:
    """The suite's base attacks (the adaptive forms are added by the runner)."""
    if suite not in SUITES:
        close = difflib.get_close_matches(suite, list(SUITES), n=1)
        raise SubmitError(f"unknown suite '{suite}'" + (f"; did you mean '{close[0]}'?" if close
                                                          else f"; use one of {list(SUITES)}"))
    return [dict(a) for a in SUITES[suite]["attacks"]]


def submission_config(registry_name: str, label: str, opts: SubmitOptions, attacks: list[dict],
                      run_dir: Path) -> dict[str, Any]:
    ds: dict[str, Any] = {"name": opts.dataset, "n": int(opts.n)}
    if opts.data_root:
        ds["root"] = opts.data_root
    return {"name": f"submit-{slug(label)}", "datasets": [ds],
            "defenses": [{"name": registry_name, "label": label,
                          "options": dict(opts.options)}],
            "attacks": attacks, "threat_models": {t: list(e) for t, e in opts.threats.items()},
            "seed": opts.seed, "device": opts.device, "batch_size": opts.batch_size,
            "random_draws": opts.random_draws, "fit_preset": opts.fit_preset,
            "schedule": opts.schedule, "run_dir": str(run_dir),
            "adaptive": dict(SUITES[opts.suite]["adaptive"]),
            "checks": dict(SUITES[opts.suite]["checks"])}


# 4. the whole submission ---------------------------------------------------------------------
def _probe(data, n: int = 32):
    import torch

    idx = torch.linspace(0, len(data) - 1, min(n, len(data))).round().long().unique()
    return data.images[idx], data.labels[idx]


def _matching_cells(store, cfg, registry_name: str, fingerprint: str, data_fp: str) -> list:
    """This submission's finished cells: its defense (name and weights), data and seed; attack
    cells for the configured threats/epsilons, with the configured options for suite labels
    (a label re-used with other options in an earlier run of the same folder is left out)."""
    wanted = {(t, round(float(e), 8)) for t, es in cfg.threat_models.items() for e in es}
    by_label = {a.label: a for a in cfg.attacks}
    out = []
    for c in store.cells("done"):
        s = c.spec
        if (s.get("defense") != registry_name or s.get("defense_sha256") != fingerprint
                or s.get("data") != data_fp or s.get("seed") != cfg.seed):
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


def snapshot(path: Path | None, folder: Path) -> str | None:
    """Copy ``path`` into ``folder`` under its sha256; returns the copy's path."""
    if not path or not Path(path).is_file():
        return None
    sha = _file_sha256(Path(path))
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{sha[:16]}{''.join(Path(path).suffixes[-1:])}"
    if not dest.exists():
        shutil.copyfile(path, dest)
    return str(dest)


def submit(spec: str, meta: Metadata, opts: SubmitOptions, *,
           log: Callable[[str], None] = print) -> SubmitResult:
    """Validate, evaluate and write the entries of one defense (see the module docstring)."""
    from bench.artifacts import prepare_defense, resolve_device
    from bench.config import config_from_dict
    from bench.data import dataset_info, load_eval
    from bench.runner import MatrixRunner
    from bench.validate import ValidationError, validate_defense
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
    log(f"evaluating {label}: {len(cfg.attacks)} attack(s) x {sum(map(len, cfg.threat_models.values()))} "
        f"epsilon(s) on {cfg.datasets[0].n} {opts.dataset} images ({runner.device}); results in "
        f"{run_dir}")
    summary = runner.run()
    if summary.errors:
        raise SubmitError(f"the evaluation reported errors: {summary.errors[0]}")
    fingerprint = _runner_fingerprint(runner.store, registry_name)
    cells = _matching_cells(runner.store, cfg, registry_name, fingerprint, data.fingerprint)

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


# rebuilding a submitted defense from its entry (verify, sweep) -------------------------------
def resolve_run_dir(entry: dict[str, Any]) -> Path:
    from leaderboard.entries import EntryError

    prov = entry["provenance"]
    cands = []
    if entry.get("_path") and prov.get("run_dir_relative"):
        cands.append(Path(entry["_path"]).parent / prov["run_dir_relative"])
    if prov.get("run_dir"):
        cands.append(Path(prov["run_dir"]))
    for c in cands:
        if (c / "results.sqlite").exists():
            return c.resolve()
    raise EntryError(f"the run directory of entry {entry['entry_id']!r} is gone (looked in "
                     f"{', '.join(map(str, cands))}); keep the run folder next to its entries")


def register_from_entry(entry: dict[str, Any], *, use_snapshot: bool = False) -> tuple[str, dict]:
    """Register the entry's defense again from its CURRENT source (or the snapshot taken at
    submission); returns the registry name and notes on what changed."""
    from leaderboard.entries import EntryError

    src = dict(entry["defense"]["source"])
    notes: dict[str, Any] = {"source_changed": False}
    if src["kind"] == "registry":
        return src["name"], notes
    path = Path(src.get("path") or "")
    snap = resolve_run_dir(entry) / src["snapshot"] if src.get("snapshot") else None
    if use_snapshot or not path.is_file():
        if snap is None or not snap.is_file():
            raise EntryError(f"the source of {entry['entry_id']!r} ({path}) and its snapshot "
                             "are both gone; restore the file")
        notes["used_snapshot"] = True
        path = snap
    sha = _file_sha256(path)
    notes["source_changed"] = sha != src.get("sha256")
    notes["source_sha256"] = sha
    if src["kind"] == "file":
        obj, new_src = load_submission(f"{path}:{src['class']}")
    else:
        obj, new_src = load_submission(src["spec"])
    if notes["source_changed"]:
        label = entry["defense"]["label"]
        return register_submission(obj, new_src, label), notes
    return register_submission(obj, {**new_src, "sha256": src.get("sha256")},
                               entry["defense"]["label"]), notes


def build_entry_defense(entry: dict[str, Any], *, device: str = "cpu", log=print,
                        use_snapshot: bool = False):
    """The entry's defense rebuilt from its current source and loaded with its RECORDED weights
    (the artifact snapshot taken at submission) when it is trainable. Returns
    ``(defense, registry_name, notes)``; a changed architecture fails to load (stale entry)."""
    from bench.artifacts import construct_defense, load_artifact, prepare_defense

    name, notes = register_from_entry(entry, use_snapshot=use_snapshot)
    prov = entry["provenance"]
    options = dict(prov.get("defense_options") or {})
    ds_opts = prov.get("dataset_options") or {}
    preset = prov.get("fit_preset") or "quick"
    art = entry["defense"].get("artifact_snapshot")
    art = resolve_run_dir(entry) / art if art else None
    defense = construct_defense(name, options, dataset=entry["dataset"], dataset_options=ds_opts,
                                device=device, preset=preset, progress=False)
    if getattr(defense, "trainable", False) and art is not None and art.is_file():
        defense.to(device)
        load_artifact(defense, art, None, device=device)
        defense.eval()
    else:
        defense, _ = prepare_defense(name, options, dataset=entry["dataset"],
                                     dataset_options=ds_opts, device=device, preset=preset,
                                     progress=False, log=log)
    return defense, name, notes


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
    from bench.config import config_from_dict
    from bench.data import dataset_info
    from bench.runner import MatrixRunner
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
                "data_fingerprint") and (c.attack == "clean" or (
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
    from bench.flags import flag

    out = []
    for i, p in enumerate(points):
        for q in points[i + 1:]:
            if q["worst_case"]["accuracy"] > p["worst_case"]["ci_high"] + 1e-12:
                out.append({**flag("eps_sweep", f"{attack}: robust accuracy rises from "
                                   f"{100 * p['worst_case']['accuracy']:.1f}% at eps {p['eps']:.4g} "
                                   f"to {100 * q['worst_case']['accuracy']:.1f}% at eps "
                                   f"{q['eps']:.4g} (beyond its 95% interval)"),
                            "source": "sweep"})
                break
        else:
            continue
        break
    for p in points:
        if threat == "linf" and p["eps"] >= 0.5 - 1e-9 and p["worst_case"]["ci_low"] > 1 / num_classes:
            out.append({**flag("eps_sweep", f"{attack}: accuracy {100 * p['worst_case']['accuracy']:.1f}% "
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
    from bench.config import parse_eps

    vals = [parse_eps(t, "--eps") for t in str(text).split(",") if t.strip()]
    if not vals:
        raise SubmitError(f"--eps {text!r}: give a comma-separated list, e.g. 0,2/255,4/255,8/255")
    if any(math.isnan(v) for v in vals):
        raise SubmitError("--eps: NaN is not an epsilon")
    return sorted(set(vals))


def describe(result: SubmitResult) -> str:
    lines = [f"{len(result.entries)} entr{'y' if len(result.entries) == 1 else 'ies'} written:"]
    for p in result.entries:
        e = json.loads(Path(p).read_text())
        lines.append(f"  {p}  clean {100 * e['clean']['accuracy']:.1f}%  worst case "
                     f"{100 * e['worst_case']['accuracy']:.1f}% "
                     f"[{100 * e['worst_case']['ci_low']:.0f}, "
                     f"{100 * e['worst_case']['ci_high']:.0f}]  flags: "
                     f"{', '.join(dict.fromkeys(f['code'] for f in e['flags'])) or '-'}")
    return "\n".join(lines)


# the command line (registered by bench/cli.py) -----------------------------------------------
SUBMIT_EXAMPLES = """
examples:
  robustmatrix submit examples/my_defense.py:BitDepthCNN --dataset test_tiny --n 20 \\
      --suite test --fit-preset tiny --name "Bit-depth CNN" --authors "A. User"
  robustmatrix submit ~/work/my_defense.py:MyDefense --dataset cifar10 --threat linf --eps 8/255 \\
      --n 500 --suite quick --paper https://arxiv.org/abs/... --architecture ResNet-20
  robustmatrix verify runs/submissions/bit_depth_cnn/entries/*.json
  robustmatrix sweep runs/submissions/bit_depth_cnn/entries/<entry>.json --eps 0,2/255,4/255,8/255
  robustmatrix publish --entries runs/submissions --out site --format md,csv,json,latex,html
"""


def add_parsers(sub: Any) -> None:
    """``submit``, ``verify``, ``sweep`` and ``publish`` (docs/submitting.md)."""
    import argparse

    fmt = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser("submit", help="validate, evaluate and write leaderboard entries for a "
                       "defense in a file (path/to/file.py:ClassName) or a registered name",
                       formatter_class=fmt, epilog=SUBMIT_EXAMPLES)
    s.add_argument("defense", help="path/to/file.py:ClassName, package.module:Class, or a "
                                   "registry / entry-point name")
    s.add_argument("--dataset", default="cifar10", help="dataset [cifar10]")
    s.add_argument("--threat", action="append", metavar="THREAT[=EPS,...]",
                   help="linf, l2, or linf=8/255 (repeatable) [linf at the dataset default]")
    s.add_argument("--eps", help="epsilon(s) for a single --threat, e.g. 8/255")
    s.add_argument("--n", default="100", help="evaluation images [100]")
    s.add_argument("--suite", default="quick", choices=sorted(SUITES),
                   help="attack suite: test (seconds), quick (CPU minutes), standard (the "
                        "reference, a GPU) [quick]")
    s.add_argument("--attack", action="append", help="replace the suite (repeatable)")
    s.add_argument("--name", help="display name [the class name]")
    s.add_argument("--authors", default="", help="e.g. 'A. Author, B. Author'")
    s.add_argument("--paper", default="", help="link to the paper or code")
    s.add_argument("--architecture", default="", help="e.g. 'WRN-28-10'")
    s.add_argument("--extra-data", action="store_true", help="trained with data beyond the "
                   "dataset's train split")
    s.add_argument("--notes", default="", help="free text shown with the entry")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="constructor option of the defense (repeatable), value parsed as YAML")
    s.add_argument("--fit-preset", default="quick", choices=["tiny", "quick", "full"],
                   help="training budget passed to the defense's fit [quick]")
    s.add_argument("--seed", default="0")
    s.add_argument("--device", default="auto")
    s.add_argument("--batch-size", default="100")
    s.add_argument("--schedule", default="full", choices=["full", "worst-case"])
    s.add_argument("--data-root", help="folder holding the datasets")
    s.add_argument("--run-dir", help="where results go [runs/submissions/<name>]")
    s.add_argument("--entries", help="where entries go [<run-dir>/entries]")
    s.add_argument("--figure", action="append", default=[], metavar="PATH",
                   help="a figure to show with the entry, e.g. a t-SNE PNG/SVG (repeatable)")
    s.add_argument("--sweep", metavar="EPS,...", help="also sweep the first suite attack over "
                   "these epsilons, e.g. 0,2/255,4/255,8/255,16/255")
    s.add_argument("--force", action="store_true", help="record contract errors as flags "
                   "instead of refusing (fatal problems are always refused)")
    s.add_argument("--no-progress", action="store_true")

    v = sub.add_parser("verify", help="re-check an entry: stored adversarials (sha256) re-scored "
                       "against the defense, a random sample of batches re-attacked")
    v.add_argument("entry", nargs="+", help="entry JSON file(s)")
    v.add_argument("--rerun", type=int, default=2, help="batches to re-attack [2]")
    v.add_argument("--seed", type=int, default=0, help="seed for choosing the batches [0]")
    v.add_argument("--device", default="cpu")
    v.add_argument("--snapshot", action="store_true", help="rebuild the defense from the source "
                   "snapshot taken at submission instead of the current file")
    v.add_argument("--json", help="also write the verification report to this file")

    w = sub.add_parser("sweep", help="robust accuracy over a grid of epsilons for an entry (one "
                       "attack configuration, run through the matrix runner)")
    w.add_argument("entry", help="entry JSON file")
    w.add_argument("--eps", required=True, help="comma-separated, e.g. 0,2/255,4/255,8/255,16/255")
    w.add_argument("--attack", default="adaptive", help="attack name [adaptive: PGD-20 through "
                   "BPDA / EOT as the defense's structure calls for]")
    w.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="attack option (repeatable), e.g. inner=pgd, inner_options={steps: 50}")
    w.add_argument("--device")
    w.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("publish", help="render entries as Markdown, CSV, JSON, LaTeX and a static "
                       "HTML leaderboard (with plots)")
    p.add_argument("--entries", action="append", required=True,
                   help="folder (searched recursively) or file of entries (repeatable)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", default="md,csv,json,latex,html",
                   help="comma-separated subset of md,csv,json,latex,html [all]")
    p.add_argument("--no-plots", action="store_true", help="skip the matplotlib figures")
    p.add_argument("--show-cost", action="store_true", help="add pass counts and wall time")
    p.add_argument("--worst-case-only", action="store_true", help="hide per-attack columns")


def _kv(pairs: list[str]) -> dict[str, Any]:
    import yaml

    from bench.config import ConfigError

    out: dict[str, Any] = {}
    for kv in pairs:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise ConfigError(f"--option {kv!r}: write KEY=VALUE, e.g. --option bits=4")
        out[k] = yaml.safe_load(v)
    return out


def _threats_from_args(args: Any) -> dict[str, list[float]]:
    from bench.config import THREATS, ConfigError, parse_eps

    items = args.threat or ["linf"]
    if args.eps and len(items) > 1:
        raise ConfigError("--eps goes with a single --threat; write --threat linf=8/255 "
                          "--threat l2=0.5 for several")
    out: dict[str, list[float]] = {}
    for t in items:
        name, _, eps = t.partition("=")
        if name not in THREATS or name == "none":
            raise ConfigError(f"--threat {t!r}: unknown threat {name!r}; use linf or l2")
        text = eps or args.eps or ""
        out[name] = [parse_eps(e, f"--threat {name}") for e in text.split(",") if e.strip()]
        if name == "linf" and any(e > 1 for e in out[name]):
            raise ConfigError(f"--threat {t}: a Linf epsilon above 1 exceeds the [0, 1] image "
                              "range; write it as a fraction, e.g. 8/255")
    return out


def _int_arg(value: str, where: str, lo: int = 1, hi: int = 1_000_000) -> int:
    from bench.config import _int

    return _int(value, where, lo, hi)


def cmd_submit(args: Any) -> int:
    from bench.validate import ValidationError

    log = _log
    opts = SubmitOptions(
        dataset=args.dataset, threats=_threats_from_args(args),
        n=_int_arg(args.n, "--n"), suite=args.suite, attacks=args.attack,
        seed=_int_arg(args.seed, "--seed", 0, 2**32 - 1), device=args.device,
        batch_size=_int_arg(args.batch_size, "--batch-size", 1, 65536),
        fit_preset=args.fit_preset, schedule=args.schedule, run_dir=args.run_dir,
        entries_dir=args.entries, data_root=args.data_root, options=_kv(args.option),
        force=args.force, progress=not args.no_progress, figures=list(args.figure))
    meta = Metadata(name=args.name, authors=args.authors, paper=args.paper,
                    architecture=args.architecture, extra_data=args.extra_data, notes=args.notes)
    sweep = parse_eps_list(args.sweep) if args.sweep else None
    try:
        result = submit(args.defense, meta, opts, log=log)
    except ValidationError as exc:
        raise SubmitError(str(exc)) from None
    if sweep:
        first = (opts.attacks or [None])[0] or SUITES[opts.suite]["attacks"][0]
        for p in result.entries:
            run_sweep(p, sweep, attack=sweep_attack_for(first), progress=opts.progress, log=log)
    print(describe(result))
    log(f"submitted in {result.wall_time:.1f} s; verify with `robustmatrix verify "
        f"{result.entries[0] if result.entries else '<entry>'}`")
    return 0


def cmd_sweep(args: Any) -> int:
    a = {"name": args.attack, **_kv(args.option)}
    if args.attack == "adaptive" and not args.option:
        a = dict(SWEEP_ATTACK)
    sw = run_sweep(args.entry, parse_eps_list(args.eps), attack=a, device=args.device,
                   progress=not args.no_progress, log=_log)
    for p in sw["points"]:
        print(f"eps {p['eps']:.4g}: robust {100 * p['worst_case']['accuracy']:.1f}% "
              f"[{100 * p['worst_case']['ci_low']:.0f}, {100 * p['worst_case']['ci_high']:.0f}]")
    return 0


def _log(msg: str) -> None:
    print(f"robustmatrix: {msg}", file=sys.stderr, flush=True)


def _one_line_errors(fn: Callable[[Any], int]) -> Callable[[Any], int]:
    """Wrap a handler so this module's expected errors end as ONE line, exit status 2 (the
    harness's own errors are handled by bench.cli.main)."""

    def run(args: Any) -> int:
        from bench.validate import ValidationError
        from leaderboard.entries import EntryError

        try:
            return fn(args)
        except (SubmitError, ValidationError, EntryError) as exc:
            print(f"robustmatrix: error: {exc}", file=sys.stderr)
            return 2

    return run


def handlers() -> dict[str, Callable[[Any], int]]:
    def verify(args: Any) -> int:
        from bench.verify import cmd_verify

        return cmd_verify(args)

    def publish(args: Any) -> int:
        from leaderboard.formats import cmd_publish

        return cmd_publish(args)

    return {"submit": _one_line_errors(cmd_submit), "verify": _one_line_errors(verify),
            "sweep": _one_line_errors(cmd_sweep), "publish": _one_line_errors(publish)}
