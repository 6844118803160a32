"""The matrix runner: expand a config into cells, run each cell batch by batch, store results.

Small steps, each testable alone (STYLE.md):

* :func:`expand` turns a :class:`BenchmarkConfig` into :class:`CellPlan` objects;
* :func:`score` re-runs the defense on given inputs (with worst-of-k draws for random
  defenses, detector flags, EVALUATION.md scoring);
* :func:`attack_batch` runs one attack on one batch, checks the adversarials independently of
  the attack (epsilon ball + 1e-6, [0, 1], no NaN), re-scores them and returns per-sample rows;
* :func:`run_benchmark` drives it all against a :class:`ResultStore`; a finished batch is never
  recomputed, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from attacks.base import Attack, perturbation_norm
from bench import flags as flagmod
from bench.artifacts import prepare_defense, resolve_device
from bench.config import BenchmarkConfig, ComponentSpec, DatasetSpec
from bench.provenance import base_provenance
from bench.registry import ATTACKS
from bench.store import SCHEMA_VERSION, ResultStore

EPS_TOL = 1e-6
CLEAN = "clean"


class AttackContractError(RuntimeError):
    """An attack returned inputs outside its threat model (a bug in the attack)."""


@dataclass
class CellPlan:
    dataset: DatasetSpec
    defense: ComponentSpec
    attack: ComponentSpec | None  # None for the clean cell
    threat: str
    eps: float

    @property
    def attack_label(self) -> str:
        return self.attack.label if self.attack else CLEAN


@dataclass
class Scored:
    pred: torch.Tensor
    correct: torch.Tensor
    flagged: torch.Tensor


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
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def attack_threats(spec: ComponentSpec) -> tuple[str, ...]:
    cls = ATTACKS.get(spec.name)
    threats = getattr(cls, "threats", None)
    if threats is None:  # a factory function: build once and ask its class
        threats = type(create_attack(spec, None)).threats
    only = spec.options.get("threat")
    return tuple(t for t in threats if only is None or t == only)


def create_attack(spec: ComponentSpec, threat: str | None, seed: int = 0) -> Attack:
    opts = dict(spec.options)
    opts.pop("threat", None)
    return ATTACKS.create(spec.name, threat=threat, seed=seed, **opts)


def expand(cfg: BenchmarkConfig) -> list[CellPlan]:
    """Every (dataset, defense, attack, threat, eps) cell, clean cells first per defense."""
    from bench.data import dataset_info

    plans: list[CellPlan] = []
    for ds in cfg.datasets:
        info = dataset_info(ds.name)
        for de in cfg.defenses:
            plans.append(CellPlan(ds, de, None, "none", 0.0))
            for threat, eps_list in cfg.threat_models.items():
                eps_values = eps_list or [info.default_eps.get(threat, 0.0)]
                for eps in eps_values:
                    for at in cfg.attacks:
                        if threat in attack_threats(at):
                            plans.append(CellPlan(ds, de, at, threat, float(eps)))
    return plans


# scoring -------------------------------------------------------------------------------------
@torch.no_grad()
def score(defense, x: torch.Tensor, y: torch.Tensor, *, draws: int = 1, seed: int = 0) -> Scored:
    """Re-run the defense: worst of ``draws`` forward passes when it is random."""
    random = bool(defense.structure.random) if hasattr(defense, "structure") else False
    k = draws if random else 1
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        preds = [defense(x).argmax(1) for _ in range(k)]
        flagged = defense.detect(x) if hasattr(defense, "detect") else None
    correct = torch.stack([p == y for p in preds]).all(0)
    if flagged is None:
        flagged = torch.zeros_like(correct)
    return Scored(preds[0], correct, flagged.bool())


def check_adversarials(adv: torch.Tensor, x: torch.Tensor, eps: float, threat: str,
                       minimal_norm: bool, attack_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent check of the attack's output; returns (adv, norm).

    Bounded attacks must stay in the ball (+1e-6) and [0, 1] with no NaN, else
    :class:`AttackContractError`. Minimal-norm attacks (CW) may overshoot: those samples are
    replaced by the clean input (counted as not broken), as the threat model requires.
    """
    if adv.shape != x.shape:
        raise AttackContractError(f"attack {attack_name} returned shape {tuple(adv.shape)} for "
                                  f"inputs {tuple(x.shape)}")
    if not torch.isfinite(adv).all():
        raise AttackContractError(f"attack {attack_name} returned NaN or infinite pixels")
    if adv.min() < 0 or adv.max() > 1:
        raise AttackContractError(f"attack {attack_name} returned pixels outside [0, 1]")
    if threat == "none":
        return adv, perturbation_norm(adv, x, "linf")
    norm = perturbation_norm(adv, x, threat)
    outside = norm > eps + EPS_TOL
    if outside.any():
        if not minimal_norm:
            raise AttackContractError(
                f"attack {attack_name} returned {int(outside.sum())} inputs outside the {threat} "
                f"ball of radius {eps:.6g} (max norm {float(norm.max()):.6g}); fix the attack's "
                "projection")
        adv = torch.where(outside.view(-1, 1, 1, 1), x, adv)
        norm = torch.where(outside, torch.zeros_like(norm), norm)
    return adv, norm


def attack_batch(defense, attack: Attack, x, y, eps, *, clean: Scored, seed: int,
                 draws: int, best_iterate: bool = True, attack_model=None
                 ) -> tuple[list[dict], torch.Tensor, dict]:
    """Run one attack on one batch and return per-sample rows, adversarials and records.

    With ``best_iterate`` (default), a sample whose returned point is not adversarial but
    for which the tracer saw a valid adversarial iterate gets that iterate instead (many library
    attacks return their LAST iterate); the count is recorded. Silent success is then what
    remains: an iterate the attack saw as adversarial that re-scoring does not confirm.
    ``attack_model`` (default: the defense) is what the attack runs on, e.g. an autocast view
    (bench.executors.AttackView); re-scoring always uses ``defense`` itself.
    """
    result = attack(defense if attack_model is None else attack_model, x, y, eps, seed=seed)
    adv, norm = check_adversarials(result.adv, x, eps, attack.threat, attack.minimal_norm,
                                   repr(attack))
    s = score(defense, adv, y, draws=draws, seed=seed)
    anyadv = result.any_iterate_adversarial
    anyadv = anyadv.to(s.correct.device) if anyadv is not None else torch.zeros_like(s.correct)
    missed = anyadv & s.correct & ~s.flagged
    recovered = 0
    if best_iterate and missed.any() and result.best_iterate is not None:
        cand, cnorm = check_adversarials(torch.where(missed.view(-1, 1, 1, 1), result.best_iterate,
                                                     adv), x, eps, attack.threat, True, repr(attack))
        s2 = score(defense, cand, y, draws=draws, seed=seed)
        take = missed & ~(s2.correct | s2.flagged)
        if take.any():
            adv = torch.where(take.view(-1, 1, 1, 1), cand, adv)
            norm = torch.where(take, cnorm, norm)
            s = Scored(torch.where(take, s2.pred, s.pred), torch.where(take, s2.correct, s.correct),
                       torch.where(take, s2.flagged, s.flagged))
            recovered = int(take.sum())
    clean_ok = clean.correct & ~clean.flagged
    adv_ok = s.correct | s.flagged
    robust = clean_ok & adv_ok
    n = len(y)
    it = result.iterations
    iters = it.tolist() if isinstance(it, torch.Tensor) else [it] * n
    silent = int((anyadv & s.correct & ~s.flagged & clean_ok).sum())
    fwd, bwd = divmod(result.forward_passes, max(n, 1)), divmod(result.backward_passes, max(n, 1))
    rows = [{"label": int(y[i]), "attacked": 1, "clean_correct": int(clean.correct[i]),
             "clean_flagged": int(clean.flagged[i]), "adv_correct": int(s.correct[i]),
             "adv_flagged": int(s.flagged[i]), "robust": int(robust[i]), "norm": float(norm[i]),
             "iterations": iters[i], "forward_passes": fwd[0] + (i < fwd[1]),
             "backward_passes": bwd[0] + (i < bwd[1]),  # shares summing to the exact totals
             "any_iterate_adversarial": int(anyadv[i]), "adv_pred": int(s.pred[i])}
            for i in range(n)]
    trace = result.loss_trace
    records = {"silent_success": silent, "recovered_best_iterates": recovered,
               "loss_still_moving": (0.0 if attack.minimal_norm
                                     else flagmod.loss_still_moving(trace)),
               "loss_trace": (trace.float().reshape(len(trace), -1).mean(1).tolist()
                              if trace is not None else None),
               "forward_passes": result.forward_passes, "backward_passes": result.backward_passes,
               "log": result.extras.get("log", [])[-50:], **flagmod.result_records(result)}
    return rows, adv, records


def _save_adv(run_dir: Path, key: str, batch: int, adv: torch.Tensor) -> tuple[str, str]:
    from safetensors.torch import save_file

    d = run_dir / "adv" / key[:20]
    d.mkdir(parents=True, exist_ok=True)
    # a temporary name of this writer's own and a content-addressed final name: two runs on one
    # store (or a rerun after a kill) never write the same file, and a batch row always points
    # at the bytes its sha256 was computed from (docs/reliability.md)
    tmp = d / f".{batch:05d}.{os.getpid()}.{threading.get_ident()}.tmp"
    save_file({"adv": adv.detach().cpu().contiguous()}, str(tmp))
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
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
    if sha256 is not None and hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
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
        from bench.executors import make_executor

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
        base = {"schema": SCHEMA_VERSION, "data": data.fingerprint, "dataset": ds.name,
                "dataset_options": ds.options, "defense": de.name, "defense_options": de.options,
                "defense_sha256": fingerprint, "seed": cfg.seed,
                "batch_size": self._resolve_batch_size(defense, x_all),
                "random_draws": cfg.random_draws, "fit_preset": cfg.fit_preset,
                **self.executor.accel.key()}
        prov_base = {**base_provenance(self.device), "config_hash": cfg.config_hash(),
                     "checkpoint_sha256": fingerprint, "artifact": info,
                     "structure": defense.structure.as_dict() if hasattr(defense, "structure") else {},
                     "sample_ids_sha256": _hash(data.sample_ids),
                     "executor": self.executor.describe()}
        defense_flags: list[dict] | None = None
        clean_scored: Scored | None = None
        prior_keys: dict[tuple[str, float], list[str]] = {}
        from attacks.adaptive import adaptive_options, adaptive_plans

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
                attack.context = {"dataset": ds.name, "dataset_options": ds.options,
                                  "device": self.device, "fit_preset": cfg.fit_preset,
                                  "run_dir": str(self.run_dir), "defense": de.label}
                spec["attack_config"] = attack.config()
            subset = torch.arange(len(y_all))
            if cfg.schedule == "worst-case" and plan.attack is not None:
                deps = prior_keys.setdefault((plan.threat, plan.eps), [])
                spec["depends_on"] = list(deps)
                subset = self._still_robust(deps, clean_scored, len(y_all))
            key = _hash(spec)
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
                           subset, clean_scored, defense_flags, summary)
            summary.cells_computed += 1

    def _clean_from_store(self, key: str) -> Scored:
        rows = self.store.samples(key)
        t = lambda f: torch.tensor([bool(r[f]) for r in rows], device=self.device)  # noqa: E731
        return Scored(torch.tensor([r["adv_pred"] for r in rows], device=self.device),
                      t("clean_correct"), t("clean_flagged"))

    def _resolve_batch_size(self, defense, x_all: torch.Tensor) -> int:
        from bench.executors import resolve_batch_size

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
                  clean: Scored, defense_flags, summary) -> None:
        """Hand the cell's missing batches to the executor; each result is stored (one
        transaction) as it arrives, then :meth:`_finish_cell` runs (at once for the local
        executor, when the last batch arrives for Ray)."""
        from bench.executors import CellJob

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
                r["idx"] = i
                r["sample_id"] = data.sample_ids[i]
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
                          defense_flags, mutated))
        self.executor.submit(job, [(b, idx) for b, idx in enumerate(batches) if b not in done],
                             x_all, y_all, clean)

    def _finish_cell(self, plan, key, prov_base, defense, attack, x_all, y_all, subset,
                     defense_flags, mutated: bool) -> None:
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
               "loss_still_moving": max([e.get("loss_still_moving", 0) or 0 for e in extras] or [0])}
        agg.update(flagmod.aggregate_extras(extras))
        flags = list(defense_flags) + flagmod.attack_checks(agg) if attack is not None else list(
            defense_flags)
        metrics = {"n_attacked": int(len(subset)), "records": agg}
        if attack is not None:
            flags += flagmod.convergence_check(defense, plan.attack, plan.threat, plan.eps, x_all,
                                               y_all, self.store.samples(key), seed=cfg.seed,
                                               draws=cfg.random_draws, checks=cfg.checks)
            if hasattr(attack, "cell_report"):  # e.g. the wrong-label latent attack's report
                metrics["report"] = attack.cell_report(extras, self.run_dir, key)
        self.store.finish_cell(key, flags=flags, metrics=metrics,
                               provenance={**prov_base, "attack": repr(attack) if attack else CLEAN})


def _fault_injection(batches_done: int) -> None:
    """Crash-safety testing: ``ROBUSTMATRIX_KILL_AFTER_BATCHES=N`` SIGKILLs this process right
    after its N-th committed batch (used by the kill/resume tests; never set in normal use)."""
    n = os.environ.get("ROBUSTMATRIX_KILL_AFTER_BATCHES")
    if n and batches_done == int(n):
        os.kill(os.getpid(), signal.SIGKILL)


def run_benchmark(cfg: BenchmarkConfig, **kw: Any) -> RunSummary:
    return MatrixRunner(cfg, **kw).run()
