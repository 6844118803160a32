"""Attack suites: what ``--suite`` runs against every submission, and the benchmark config a
submission runs (:func:`submission_config`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness.submission.load import SubmitError, slug


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


#: attack suites: what ``--suite`` runs against every submission. The runner adds the adaptive
#: forms the defense's declared structure calls for (BPDA, EOT, detector-aware, transfer, Square,
#: AutoAttack ``rand``; ``bench/harness/adaptive_policy.py``) with the suite's ``adaptive``
#: options, and runs the default checks (DEFAULT_CHECKS) with the suite's ``checks`` over them
#: (docs/checklist.md).
SUITES: dict[str, dict[str, Any]] = {
    # seconds on test_tiny; for the test-suite and trying the command out
    "test": {"attacks": [{"name": "test_pgd"}],
             "adaptive": {"square_queries": 50, "eot_draws": 2},
             "checks": {}},
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
