"""The matrix runner: expand a config into cells, run each cell batch by batch, store results.

Small steps, each testable alone (STYLE.md):

* :func:`bench.harness.planning.expand` turns a :class:`BenchmarkConfig` into cells;
* :func:`bench.harness.scoring.score` / :func:`~bench.harness.scoring.attack_batch` re-score
  the defense and run one attack on one batch (an executor calls them);
* :class:`MatrixRunner` drives it all against a :class:`ResultStore`; a finished batch is never
  recomputed, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from attacks.base import RunContext
from bench.artifacts import prepare_defense, resolve_device
from bench.core.config import BenchmarkConfig
from bench.core.hashing import file_sha256, json_sha256
from bench.core.provenance import base_provenance
from bench.core.schema import Schedule
from bench.core.store import SCHEMA_VERSION, ResultStore
from bench.harness import evidence
from bench.harness import flags as flagmod
from bench.harness.planning import CLEAN, CellPlan, create_attack, expand
from bench.harness.scoring import AttackContractError, Scored, score


@dataclass
class RunSummary:
    run_dir: Path
    cells_total: int = 0
    cells_computed: int = 0
    cells_reused: int = 0
    batches_computed: int = 0
    wall_time: float = 0.0
    errors: list[str] = field(default_factory=list)
    #: the cell keys of THIS config (computed or reused): what its leaderboard shows, even when
    #: the run directory also holds cells of an earlier, different config
    keys: list[str] = field(default_factory=list)


def _hash(obj: Any) -> str:
    return json_sha256(obj)


def _save_adv(run_dir: Path, key: str, batch: int, adv: torch.Tensor) -> tuple[str, str]:
    from safetensors.torch import save_file

    d = run_dir / "adv" / key[:20]
    d.mkdir(parents=True, exist_ok=True)
    # a temporary name of this writer's own and a content-addressed final name: two runs on one
    # store (or a rerun after a kill) never write the same file, and a batch row always points
    # at the bytes its sha256 was computed from (docs/reliability.md)
    tmp = d / f".{batch:05d}.{os.getpid()}.{threading.get_ident()}.tmp"
    save_file({"adv": adv.detach().cpu().contiguous()}, str(tmp))
    sha = file_sha256(tmp)
    path = d / f"{batch:05d}-{sha[:16]}.safetensors"
    os.replace(tmp, path)
    return str(path.relative_to(run_dir)), sha


def load_adv(run_dir: Path, rel_path: str, sha256: str | None = None) -> torch.Tensor:
    from safetensors.torch import load_file

    root = Path(run_dir).resolve()
    path = (root / rel_path).resolve()
    if root not in path.parents:  # a stored path (store, entry) is data: it stays in the run dir
        raise ValueError(f"stored adversarials path {rel_path!r} points outside the run directory "
                         f"{root}; the store or entry was tampered with")
    if sha256 is not None and file_sha256(path) != sha256:
        raise ValueError(f"stored adversarials {path} do not match their sha256; the run "
                         "directory was modified: re-run the cell")
    return load_file(str(path))["adv"]


# the driver ----------------------------------------------------------------------------------
class MatrixRunner:
    """Runs a config against a store. ``executor`` runs the batches of a cell (local default)."""

    def __init__(self, cfg: BenchmarkConfig, *, progress: bool = True,
                 log: Callable[[str], None] = print, run_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.progress = progress
        self.log = log
        self.run_dir = Path(run_dir or cfg.run_dir).expanduser().resolve()
        self.device = resolve_device(cfg.device)
        self.store = ResultStore(self.run_dir / "results.sqlite")
        from bench.harness.executors import make_executor

        self.executor = make_executor(cfg, device=self.device, log=log, progress=progress)
        self.batch_size: int | None = None  # resolved per defense (batch_size: auto)

    def run(self) -> RunSummary:
        from bench.data import load_eval

        t0 = time.perf_counter()
        cfg = self.cfg
        summary = RunSummary(self.run_dir)
        plans = expand(cfg)
        summary.cells_total = len(plans)
        (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
        by_group: dict[tuple[int, int], list[CellPlan]] = {}
        for p in plans:
            by_group.setdefault((cfg.datasets.index(p.dataset), cfg.defenses.index(p.defense)),
                                []).append(p)
        data_cache: dict[int, Any] = {}
        for (di, _), group in by_group.items():
            ds = group[0].dataset
            if di not in data_cache:
                load_kw = {k: v for k, v in ds.options.items()
                           if k in ("root", "source", "resolution", "split", "on_bad_image")}
                data_cache[di] = load_eval(ds.name, ds.n, seed=cfg.seed, **load_kw)
            data = data_cache[di]
            self._run_group(group, data, summary)
            self.executor.drain()  # every cell of this defense stored (Ray: as tasks finish)
        flagmod.store_matrix_flags(self.store)  # checks across cells (EVALUATION.md 4, 7, 8)
        self.executor.close()
        summary.wall_time = time.perf_counter() - t0
        return summary

    def _run_group(self, group: list[CellPlan], data, summary: RunSummary) -> None:
        cfg = self.cfg
        de = group[0].defense
        ds = group[0].dataset
        defense, info = prepare_defense(de.name, de.options, dataset=ds.name,
                                        dataset_options=ds.options, device=self.device,
                                        preset=cfg.fit_preset, progress=self.progress, log=self.log)
        x_all = data.images.to(self.device)
        y_all = data.labels.to(self.device)
        fingerprint = defense.fingerprint() if hasattr(defense, "fingerprint") else ""
        pixels = data.pixel_sha256  # the images themselves, not only their ids
        base = {"schema": SCHEMA_VERSION, "data": data.fingerprint, "pixels": pixels,
                "dataset": ds.name,
                "dataset_options": ds.options, "defense": de.name, "defense_options": de.options,
                "defense_sha256": fingerprint, "seed": cfg.seed,
                "batch_size": self._resolve_batch_size(defense, x_all),
                "random_draws": cfg.random_draws, "fit_preset": cfg.fit_preset,
                **self.executor.accel.key()}
        prov_base = {**base_provenance(self.device), "config_hash": cfg.config_hash(),
                     "checkpoint_sha256": fingerprint, "artifact": info,
                     "structure": (defense.structure.as_dict()
                                   if hasattr(defense, "structure") else {}),
                     "sample_ids_sha256": _hash(data.sample_ids), "pixels_sha256": pixels,
                     "executor": self.executor.describe()}
        context = RunContext(dataset=ds.name, dataset_options=ds.options, device=self.device,
                             fit_preset=cfg.fit_preset, run_dir=str(self.run_dir),
                             defense=de.label)
        defense_flags: list[dict] | None = None
        clean_scored: Scored | None = None
        prior_keys: dict[tuple[str, float], list[str]] = {}
        from bench.harness.adaptive_policy import adaptive_options, adaptive_plans

        if adaptive_options(cfg.adaptive)["enabled"]:  # adaptive cells from the structure
            defense_flags = flagmod.defense_checks(defense, x_all, y_all, seed=cfg.seed,
                                                   checks=cfg.checks, draws=cfg.random_draws)
            extra = adaptive_plans(defense, group, cfg.adaptive, [f["code"] for f in defense_flags])
            group = group + extra
            summary.cells_total += len(extra)
        for plan in group:
            spec = {**base, "attack": plan.attack.name if plan.attack else CLEAN,
                    "attack_options": plan.attack.options if plan.attack else {},
                    "threat": plan.threat, "eps": plan.eps}
            attack = None
            if plan.attack is not None:
                attack = create_attack(plan.attack, plan.threat, seed=cfg.seed)
                spec["attack_config"] = attack.config()
            subset = torch.arange(len(y_all))
            if cfg.schedule == Schedule.WORST_CASE and plan.attack is not None:
                deps = prior_keys.setdefault((plan.threat, plan.eps), [])
                spec["depends_on"] = list(deps)
                subset = self._still_robust(deps, clean_scored, len(y_all))
            key = self._key(spec, pixels)
            summary.keys.append(key)
            if plan.attack is not None:
                prior_keys.setdefault((plan.threat, plan.eps), []).append(key)
            existing = self.store.cell(key)
            if clean_scored is None and plan.attack is None:
                clean_scored = score(defense, x_all, y_all, draws=cfg.random_draws, seed=cfg.seed) \
                    if not (existing and existing.status == "done") else self._clean_from_store(key)
            if existing is not None and existing.status == "done":
                summary.cells_reused += 1
                continue
            if clean_scored is None:
                clean_scored = score(defense, x_all, y_all, draws=cfg.random_draws, seed=cfg.seed)
            if defense_flags is None:
                defense_flags = flagmod.defense_checks(defense, x_all, y_all, seed=cfg.seed,
                                                       checks=cfg.checks, draws=cfg.random_draws)
            self._run_cell(plan, key, spec, prov_base, defense, attack, x_all, y_all, data,
                           subset, clean_scored, defense_flags, summary, context)
            summary.cells_computed += 1

    def _key(self, spec: dict, pixels: str) -> str:
        """The cell key: the sha256 of its spec, which holds the pixel hash of the evaluated
        images. A store written before keys held it has the cell under the key of the spec
        without ``pixels``; such a cell is reused (and a partial one resumed) when its
        provenance records no pixel hash or this one, so an existing run keeps its results."""
        key = _hash(spec)
        if self.store.cell(key) is not None:
            return key
        legacy = _hash({k: v for k, v in spec.items() if k != "pixels"})
        old = self.store.cell(legacy)
        if old is None or old.provenance.get("pixels_sha256") not in (None, pixels):
            return key
        if not getattr(self, "_legacy_noted", False):
            self._legacy_noted = True
            self.log("this run directory holds cells stored before cell keys carried the pixel "
                     "hash of the images; reusing them (their provenance records the hash from "
                     "now on)")
        return legacy

    def _clean_from_store(self, key: str) -> Scored:
        rows = self.store.samples(key)
        t = lambda f: torch.tensor([bool(r[f]) for r in rows], device=self.device)  # noqa: E731
        return Scored(torch.tensor([r["adv_pred"] for r in rows], device=self.device),
                      t("clean_correct"), t("clean_flagged"))

    def _resolve_batch_size(self, defense, x_all: torch.Tensor) -> int:
        from bench.harness.executors import resolve_batch_size

        self.batch_size = resolve_batch_size(self.cfg.batch_size, defense, x_all,
                                             device=self.device)
        return self.batch_size

    def _still_robust(self, dep_keys: list[str], clean: Scored | None, n: int) -> torch.Tensor:
        self.executor.drain()  # the cells it depends on may still be computing (Ray)
        robust = torch.ones(n, dtype=torch.bool)
        if clean is not None:
            robust &= (clean.correct & ~clean.flagged).cpu()
        for k in dep_keys:
            for r in self.store.samples(k):
                if not r["robust"]:
                    robust[r["idx"]] = False
        return torch.nonzero(robust).flatten()

    def _run_cell(self, plan, key, spec, prov_base, defense, attack, x_all, y_all, data, subset,
                  clean: Scored, defense_flags, summary, context: RunContext) -> None:
        """Hand the cell's missing batches to the executor; each result is stored (one
        transaction) as it arrives, then :meth:`_finish_cell` runs (at once for the local
        executor, when the last batch arrives for Ray)."""
        from bench.harness.executors import CellJob

        cfg = self.cfg
        bs = self.batch_size or int(cfg.batch_size)
        batches = [subset[i:i + bs] for i in range(0, len(subset), bs)]
        self.store.begin_cell(key, dataset=plan.dataset.name, defense=plan.defense.label,
                              attack=plan.attack_label, threat=plan.threat, eps=plan.eps,
                              n_batches=len(batches), spec=spec, provenance=prov_base)
        done = self.store.done_batches(key)
        desc = f"{plan.dataset.name} | {plan.defense.label} | {plan.attack_label}" + (
            f" {plan.threat} {plan.eps:.4g}" if plan.attack else "")

        def store_batch(out) -> None:
            adv_path = sha = None
            if out.adv is not None:
                adv_path, sha = _save_adv(self.run_dir, key, out.batch, out.adv)
            for r, i in zip(out.rows, out.idx.tolist()):
                r.idx = i
                r.sample_id = data.sample_ids[i]
            self.store.add_batch(key, out.batch, out.rows, adv_path=adv_path, adv_sha256=sha,
                                 wall_time=out.wall_time, extras=out.records)
            summary.batches_computed += 1
            _fault_injection(summary.batches_computed)

        recipe = {"name": plan.defense.name, "options": plan.defense.options,
                  "dataset": plan.dataset.name, "dataset_options": plan.dataset.options,
                  "preset": cfg.fit_preset}
        job = CellJob(key, desc, defense, attack, plan.eps, cfg.seed, cfg.random_draws,
                      spec.get("defense_sha256") or "", recipe, on_batch=store_batch,
                      on_done=lambda mutated: self._finish_cell(
                          plan, key, prov_base, defense, attack, x_all, y_all, subset,
                          defense_flags, mutated, context), context=context)
        self.executor.submit(job, [(b, idx) for b, idx in enumerate(batches) if b not in done],
                             x_all, y_all, clean)

    def _finish_cell(self, plan, key, prov_base, defense, attack, x_all, y_all, subset,
                     defense_flags, mutated: bool, context: RunContext) -> None:
        """Every batch is stored: aggregate records, flags and metrics; mark the cell done."""
        cfg = self.cfg
        if mutated:
            raise AttackContractError(
                f"the defense's weights or buffers changed during {plan.attack_label} (e.g. "
                "BatchNorm statistics updated in training mode); the cell is not stored as done. "
                "Keep the defense in eval mode and do not mutate state in forward()")
        extras = self.store.batch_extras(key)
        agg = {"silent_success": sum(e.get("silent_success", 0) for e in extras),
               "recovered_best_iterates": sum(e.get("recovered_best_iterates", 0) for e in extras),
               "loss_still_moving": max([e.get("loss_still_moving", 0) or 0 for e in extras]
                                        or [0])}
        agg.update(flagmod.aggregate_extras(extras))
        flags = list(defense_flags) + flagmod.attack_checks(agg) if attack is not None else list(
            defense_flags)
        metrics = {"n_attacked": int(len(subset)), "records": agg}
        if attack is not None:
            conv = flagmod.convergence_check(defense, plan.attack, plan.threat, plan.eps, x_all,
                                             y_all, self.store.samples(key), seed=cfg.seed,
                                             draws=cfg.random_draws, checks=cfg.checks)
            flags += conv
            checks = self._evidence(plan, defense, attack, x_all, y_all, key)
            flags += evidence.as_flags(checks)
            checks += evidence.flag_records(plan, cfg.checks, agg, flags, conv,
                                            flagmod.doubled_spec(plan.attack, plan.threat)
                                            is not None)
            metrics["checks"] = checks
            from bench.harness.scoring import detector_summary

            det = detector_summary(extras)
            if det is not None:  # detector defenses: AUROC clean vs adversarial (leaderboard)
                metrics["detector"] = det
            if hasattr(attack, "cell_report"):  # e.g. the wrong-label latent attack's report
                metrics["report"] = attack.cell_report(extras, self.run_dir, key, context=context)
        self.store.finish_cell(key, flags=flags, metrics=metrics,
                               provenance={**prov_base,
                                           "attack": repr(attack) if attack else CLEAN})


    def _evidence(self, plan, defense, attack, x_all, y_all, key: str) -> list[dict]:
        """The per-row evidence checks (bench/harness/evidence.py) on bounded subsamples of the
        cell's clean-correct points (sizes from ``checks``; defaults in DEFAULT_CHECKS)."""
        cfg, chk = self.cfg, self.cfg.checks
        rows = [r for r in sorted(self.store.samples(key), key=lambda r: r["idx"])
                if r["clean_correct"] and not r["clean_flagged"]]
        if not rows:
            return []

        def subset(n: int):
            picked = rows[:n]
            self._subset_ids = [r["idx"] for r in picked]
            idx = torch.tensor([r["idx"] for r in picked])
            robust = torch.tensor([bool(r["robust"]) for r in picked])
            return x_all[idx.to(x_all.device)], y_all[idx.to(y_all.device)], robust

        out: list[dict] = []
        kind = flagmod.attack_kind_name(plan.attack.name)
        if list(plan.attack.options.get("attacks") or []) == ["square"]:
            kind = "black-box"
        # the binary tasks and the single-step / gradient-free runs depend on the defense,
        # threat, epsilon and points only: computed once per row, reused by its other attacks
        cache = self.__dict__.setdefault("_evidence_cache", {})
        row = (plan.dataset.name, plan.defense.label, plan.threat, float(plan.eps))
        nb = int(chk.get("binarization_subset", 0) or 0)
        if nb > 0 and not attack.minimal_norm:
            x, y, _ = subset(nb)
            opts = {"n_inner": int(chk.get("binarization_inner", 999)), "seed": cfg.seed}
            tkey = ("bin", *row, tuple(self._subset_ids), opts["n_inner"])
            if tkey not in cache and evidence.binarization_unavailable(defense) is None:
                cache[tkey] = evidence.binary_tasks(defense, plan.threat, plan.eps, x, **opts)
            out.append({**evidence.binarization_test(
                defense, attack, plan.threat, plan.eps, x, y, n=nb, tasks=cache.get(tkey),
                min_pass_rate=float(chk.get("binarization_min_pass", 0.9)), **opts),
                "kind": kind})
        ns = int(chk.get("stability_subset", 0) or 0)
        if ns > 0:
            x, y, _ = subset(ns)
            out.append(evidence.unstable_predictions(
                defense, x, y, plan.threat, plan.eps, seed=cfg.seed,
                tol=float(chk.get("stability_tol", 0.1))))
        nq = int(chk.get("sanity_subset", 0) or 0)
        if nq > 0 and kind == "white-box":
            x, y, robust = subset(nq)
            ids = list(self._subset_ids)
            for fn in (evidence.single_step_check, evidence.gradient_free_check):
                skey = (fn.__name__, *row, tuple(ids))
                more = {"queries": int(chk.get("sanity_queries", 300))} \
                    if fn is evidence.gradient_free_check else {}
                rec = fn(defense, plan.threat, plan.eps, x, y, robust, seed=cfg.seed,
                         draws=cfg.random_draws, broken=cache.get(skey), **more)
                if "broken" in rec:
                    cache[skey] = torch.tensor(rec["broken"], dtype=torch.bool)
                out.append({**rec, "idx": ids})
        return out


def _fault_injection(batches_done: int) -> None:
    """Crash-safety testing: ``ROBUSTMATRIX_KILL_AFTER_BATCHES=N`` SIGKILLs this process right
    after its N-th committed batch (used by the kill/resume tests; never set in normal use)."""
    n = os.environ.get("ROBUSTMATRIX_KILL_AFTER_BATCHES")
    if n and batches_done == int(n):
        os.kill(os.getpid(), signal.SIGKILL)

