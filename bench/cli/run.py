"""``robustmatrix run [CONFIG]``: run a benchmark matrix (a preset or a YAML config)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.cli.errors import info

EXAMPLES = """
examples:
  robustmatrix run                      # the quick preset: CIFAR-10, a few minutes on a CPU
  robustmatrix run smoke                # seconds, synthetic data (what the tests use)
  robustmatrix run my_matrix.yaml       # your own config (see bench/presets/*.yaml)
  robustmatrix run quick --defense undefended --attack pgd --n 50 --threat linf=4/255
  robustmatrix run quick --executor ray   # one Ray task per batch (pip install -e '.[ray]')
  robustmatrix list defenses            # what can be benchmarked
  robustmatrix leaderboard --run-dir runs/quick
  robustmatrix fit srd --dataset cifar10 --preset quick
"""


def add_parser(sub: Any) -> None:
    r = sub.add_parser("run", help="run a benchmark matrix (a preset or a YAML config)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    r.add_argument("config", nargs="?", default="quick",
                   help="preset (smoke, quick, full) or path to a YAML config [quick]")
    r.add_argument("--dataset", action="append", help="replace the datasets (repeatable)")
    r.add_argument("--defense", action="append", help="replace the defenses (repeatable)")
    r.add_argument("--attack", action="append", help="replace the attacks (repeatable)")
    r.add_argument("--threat", action="append", metavar="THREAT[=EPS,...]",
                   help="replace the threat models, e.g. linf=8/255 or l2=0.5 (repeatable)")
    r.add_argument("--n", type=str, help="examples per dataset")
    r.add_argument("--seed", type=str, help="seed for data subset and attacks")
    r.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    r.add_argument("--batch-size", type=str,
                   help="examples per attack batch, or auto (fills the GPU)")
    r.add_argument("--executor", choices=["local", "ray"],
                   help="local (in-process, default) or ray (one task per batch; pip install -e "
                        "'.[ray]')")
    r.add_argument("--address", help="Ray cluster to join (implies --executor ray) [a local one]")
    r.add_argument("--schedule", choices=["full", "worst-case"],
                   help="full: every attack on every sample; worst-case: later attacks only on "
                        "samples still unbroken (AutoAttack-style)")
    r.add_argument("--data-root", help="folder holding the datasets (else ROBUSTMATRIX_DATA, "
                                       "../shared/data, or download)")
    r.add_argument("--run-dir", help="where the store and tables go [runs/<config name>]")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--show-cost", action="store_true", help="add pass counts and wall time")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from bench.core.config import ConfigError

    o: dict[str, Any] = {}
    if args.dataset:
        o["datasets"] = list(args.dataset)
    if args.defense:
        o["defenses"] = list(args.defense)
    if args.attack:
        o["attacks"] = list(args.attack)
    if args.threat:
        tm: dict[str, list] = {}
        for t in args.threat:
            name, _, eps = t.partition("=")
            if not name:
                raise ConfigError(f"--threat {t!r}: write THREAT or THREAT=EPS, e.g. linf=8/255")
            tm[name] = [e for e in eps.split(",") if e] if eps else []
        o["threat_models"] = tm
    if args.executor or args.address:
        if args.address and args.executor == "local":
            raise ConfigError("--address is for the ray executor; drop it or use --executor ray")
        o["executor"] = ({"name": "ray", "address": args.address} if args.address
                         else args.executor)
    for key in ("n", "seed", "device", "batch_size", "schedule", "run_dir"):
        v = getattr(args, key, None)
        if v is not None:
            o[key] = v
    return o


def run(args: argparse.Namespace) -> int:
    from bench.core.config import (
        PRESETS_DIR,
        ConfigError,
        check_top_level,
        config_from_dict,
        load_config,
        read_config_file,
    )
    from bench.harness.runner import MatrixRunner
    from leaderboard.formats import to_markdown, write_all
    from leaderboard.table import build_records, build_tables

    if not args.config.isprintable():
        raise ConfigError(f"no preset or config file {args.config!r}; use a preset (smoke, "
                          "quick, full) or a path to a YAML file")
    path = Path(args.config)
    if not path.suffix and (PRESETS_DIR / f"{args.config}.yaml").exists():
        path = PRESETS_DIR / f"{args.config}.yaml"
    if not path.exists():
        load_config(args.config)  # raises the one-line error
    raw = read_config_file(path)  # a regular file of bounded size, safe YAML
    check_top_level(raw, str(path))
    raw.update(_overrides(args))
    if getattr(args, "n", None) is not None and isinstance(raw.get("datasets"), list):
        # --n overrides a preset's per-dataset n too (flags beat presets)
        raw["datasets"] = [{k: v for k, v in d.items() if k != "n"} if isinstance(d, dict) else d
                           for d in raw["datasets"]]
    if args.data_root:
        ds = raw.get("datasets", ["cifar10"])
        ds = [ds] if isinstance(ds, str) else ds
        if isinstance(ds, list):  # anything else is refused by config_from_dict
            raw["datasets"] = [({"name": d, "root": args.data_root} if isinstance(d, str)
                                else {**d, "root": args.data_root} if isinstance(d, dict)
                                else d) for d in ds]
    cfg = config_from_dict(raw, source=str(path))
    _validate_names(cfg)
    runner = MatrixRunner(cfg, progress=not args.no_progress, log=info)
    info(f"running '{cfg.name}' on {runner.device}; results in {runner.run_dir}")
    summary = runner.run()
    info(f"{summary.cells_computed} cells computed, {summary.cells_reused} reused "
          f"({summary.batches_computed} batches) in {summary.wall_time:.1f} s")
    records = build_records(runner.store, summary.keys)  # this config's cells only
    print(to_markdown(build_tables(runner.store, show_cost=args.show_cost, records=records)))
    out = write_all(runner.store, runner.run_dir / "leaderboard", show_cost=args.show_cost,
                    records=records)
    info(f"tables written to {out['markdown'].parent}")
    return 0


def _validate_names(cfg) -> None:
    """Fail fast, before any work, on an unknown dataset, defense or attack name."""
    from bench.core.registry import ATTACKS, DATASETS, DEFENSES

    for d in cfg.datasets:
        DATASETS.get(d.name)
    for d in cfg.defenses:
        DEFENSES.get(d.name)
    for a in cfg.attacks:
        ATTACKS.get(a.name)
