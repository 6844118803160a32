"""The command line: ``robustmatrix run | list | leaderboard | fit``.

Every expected failure (bad config, unknown name, missing data, checksum mismatch, unusable
store) ends with ONE line, ``robustmatrix: error: ...``, naming the problem and the fix, and
exit status 2. Nothing already stored is touched by a failing command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

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


def _expected_errors() -> tuple[type[BaseException], ...]:
    from attacks.base import Attack  # noqa: F401  (import check)
    from bench.artifacts import ArtifactError
    from bench.config import ConfigError
    from bench.registry import RegistryError
    from bench.store import StoreError

    from bench.runner import AttackContractError

    errs: list[type[BaseException]] = [ConfigError, RegistryError, StoreError, ArtifactError,
                                       AttackContractError]
    try:
        from bench.data import DataError
        errs.append(DataError)
    except ImportError:
        pass
    try:
        from bench.models import CheckpointError, ChecksumError
        errs += [ChecksumError, CheckpointError]  # a checkpoint that is not one (HTML, junk)
    except ImportError:
        pass
    from defenses.base import DefenseNotFittedError

    errs.append(DefenseNotFittedError)
    from bench.sandbox import SandboxError  # submitted code that crashed, hung or ran out of memory

    errs.append(SandboxError)
    return tuple(errs)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line too (exit status 2), like every other error."""

    def error(self, message: str):  # type: ignore[override]
        from bench.config import one_line

        self.exit(2, f"robustmatrix: error: {one_line(message)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="robustmatrix", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Adversarial robustness benchmark: every defense against every attack, with "
                    "adaptive attacks, reliability flags and a resumable result store.",
        epilog=EXAMPLES)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

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

    ls = sub.add_parser("list", help="list registered defenses, attacks, datasets, models, presets")
    ls.add_argument("what", nargs="?", default="all",
                    choices=["all", "defenses", "attacks", "datasets", "models", "presets"])
    ls.add_argument("--pattern", default="*", help="fnmatch pattern, e.g. 'pgd*'")
    ls.add_argument("--tests", action="store_true", help="include the tiny test_* entries")

    lb = sub.add_parser("leaderboard", help="print and write the leaderboard of a run")
    lb.add_argument("--run-dir", default="runs/quick", help="the run directory [runs/quick]")
    lb.add_argument("--out", help="where to write the tables [<run-dir>/leaderboard]")
    lb.add_argument("--worst-case-only", action="store_true", help="hide per-attack columns")
    lb.add_argument("--show-cost", action="store_true", help="add pass counts and wall time")
    lb.add_argument("--short-flags", action="store_true",
                    help="print flag codes only (the files keep what was seen and what to try)")

    from bench.config import FIT_PRESETS

    f = sub.add_parser("fit", help="train a defense's trainable parts (cached by content)")
    f.add_argument("defense")
    f.add_argument("--dataset", default="cifar10")
    f.add_argument("--preset", default="quick", choices=list(FIT_PRESETS))
    f.add_argument("--resolution", type=int, help="image size (ImageNet-10)")
    f.add_argument("--data-root")
    f.add_argument("--device", default="auto")
    f.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="defense option (repeatable), value parsed as YAML")
    f.add_argument("--report", action="store_true",
                   help="also write the defense's report (metrics, figures) when it has one")
    f.add_argument("--out", help="folder for reports and figures [runs/fit/<defense>]")
    f.add_argument("--report-n", type=int, default=500, metavar="N",
                   help="held-out test images the report measures on [500]")
    f.add_argument("--ship", action="store_true",
                   help="copy the artifact into defenses/weights with a model card (then pin "
                        "its sha256 in bench.artifacts.SHIPPED)")
    f.add_argument("--ship-dir", help="with --ship: the folder [defenses/weights]")
    f.add_argument("--card-results", action="append", default=[], metavar="RUN_DIR",
                   help="with --ship: runs whose leaderboard gives the card's measured accuracy")
    f.add_argument("--card-label", help="with --card-results: the defense's label in those runs "
                                        "[the defense name]")

    from bench.submit import add_parsers as add_submission_parsers  # submit verify sweep publish

    add_submission_parsers(sub)
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from bench.config import ConfigError

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


def cmd_run(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from bench.config import PRESETS_DIR, config_from_dict
    from bench.runner import MatrixRunner
    from leaderboard.formats import to_markdown, write_all
    from leaderboard.table import build_records, build_tables

    from bench.config import ConfigError, load_config

    if not args.config.isprintable():
        raise ConfigError(f"no preset or config file {args.config!r}; use a preset (smoke, "
                          "quick, full) or a path to a YAML file")
    path = Path(args.config)
    if not path.suffix and (PRESETS_DIR / f"{args.config}.yaml").exists():
        path = PRESETS_DIR / f"{args.config}.yaml"
    if not path.exists():
        load_config(args.config)  # raises the one-line error
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        load_config(str(path))
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # a folder, binary
        raise ConfigError(f"{path}: cannot read it as a YAML config ({exc}); give a preset or a "
                          "YAML file") from None
    if not isinstance(raw, dict):
        raw = {"__invalid__": raw}
    raw.update(_overrides(args))
    if args.data_root:
        ds = raw.get("datasets", ["cifar10"])
        ds = [ds] if isinstance(ds, str) else ds
        if isinstance(ds, list):  # anything else is refused by config_from_dict
            raw["datasets"] = [({"name": d, "root": args.data_root} if isinstance(d, str)
                                else {**d, "root": args.data_root} if isinstance(d, dict)
                                else d) for d in ds]
    cfg = config_from_dict(raw, source=str(path))
    _validate_names(cfg)
    runner = MatrixRunner(cfg, progress=not args.no_progress, log=_info)
    _info(f"running '{cfg.name}' on {runner.device}; results in {runner.run_dir}")
    summary = runner.run()
    _info(f"{summary.cells_computed} cells computed, {summary.cells_reused} reused "
          f"({summary.batches_computed} batches) in {summary.wall_time:.1f} s")
    records = build_records(runner.store, summary.keys)  # this config's cells only
    print(to_markdown(build_tables(runner.store, show_cost=args.show_cost, records=records)))
    out = write_all(runner.store, runner.run_dir / "leaderboard", show_cost=args.show_cost,
                    records=records)
    _info(f"tables written to {out['markdown'].parent}")
    del dataclasses
    return 0


def _validate_names(cfg) -> None:
    """Fail fast, before any work, on an unknown dataset, defense or attack name."""
    from bench.registry import ATTACKS, DATASETS, DEFENSES

    for d in cfg.datasets:
        DATASETS.get(d.name)
    for d in cfg.defenses:
        DEFENSES.get(d.name)
    for a in cfg.attacks:
        ATTACKS.get(a.name)


def cmd_list(args: argparse.Namespace) -> int:
    from bench.config import list_presets
    from bench.registry import ATTACKS, DATASETS, DEFENSES, MODELS

    regs = {"defenses": DEFENSES, "attacks": ATTACKS, "datasets": DATASETS, "models": MODELS}
    kinds = list(regs) + ["presets"] if args.what == "all" else [args.what]
    for kind in kinds:
        if kind == "presets":
            names = list_presets()
            docs = {n: "" for n in names}
        else:
            reg = regs[kind]
            names = reg.list(args.pattern, include_test=args.tests)
            docs = {n: _first_line(reg.get(n).__doc__) for n in names}
        print(f"{kind}:")
        for n in names:
            print(f"  {n:28s} {docs[n]}")
    return 0


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc and doc.strip() else ""


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from bench.store import ResultStore
    from leaderboard.formats import to_markdown, write_all
    from leaderboard.table import build_records, build_tables

    store = ResultStore(Path(args.run_dir) / "results.sqlite", readonly=True)
    records = build_records(store)
    tables = build_tables(store, per_attack=not args.worst_case_only, show_cost=args.show_cost,
                          flag_detail=not args.short_flags, records=records)
    if not tables:
        _info(f"no finished cells in {args.run_dir} yet")
        return 0
    print(to_markdown(tables))
    out = Path(args.out) if args.out else Path(args.run_dir) / "leaderboard"
    write_all(store, out, per_attack=not args.worst_case_only, show_cost=args.show_cost,
              records=records)
    _info(f"tables written to {out}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    import time

    import yaml

    from bench.artifacts import prepare_defense, resolve_device
    from bench.config import ConfigError
    from bench.registry import DEFENSES

    DEFENSES.get(args.defense)
    options: dict[str, Any] = {}
    for kv in args.option:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise ConfigError(f"--option {kv!r}: write KEY=VALUE, e.g. --option epochs=2")
        options[k] = yaml.safe_load(v)
    ds_opts: dict[str, Any] = {}
    if args.resolution:
        ds_opts["resolution"] = args.resolution
    if args.data_root:
        ds_opts["root"] = args.data_root
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    defense, info = prepare_defense(args.defense, options, dataset=args.dataset,
                                    dataset_options=ds_opts, device=device, preset=args.preset,
                                    progress=True, log=_info)
    took = time.perf_counter() - t0
    if not getattr(defense, "trainable", False):
        _info(f"{args.defense} has nothing to fit")
    else:
        state = "fitted" if info["fit_seconds"] else "reused cached artifact"
        _info(f"{args.defense} on {args.dataset}: {state} in {took:.1f} s -> {info['artifact']}")
        if args.ship:
            from bench.artifacts import SHIPPED_DIR
            from bench.model_card import measured_rows, ship

            measured = [r for run in args.card_results
                        for r in measured_rows(Path(run), args.card_label or args.defense)]
            dest = ship(Path(info["artifact"]), name=args.defense, dataset=args.dataset,
                        resolution=args.resolution, preset=info["preset"],
                        dest_dir=Path(args.ship_dir) if args.ship_dir else SHIPPED_DIR,
                        measured=measured, source_runs=list(args.card_results))
            from bench.models.checkpoint import sha256_file

            _info(f"shipped {dest} (model card {dest.with_suffix('.md').name}); pin it in "
                  f"bench.artifacts.SHIPPED: ({args.defense!r}, {args.dataset!r}, "
                  f"{args.resolution!r}, {info['preset']!r}): "
                  f"Shipped({dest.name!r}, {sha256_file(dest)!r})")
    if args.report:
        if not hasattr(defense, "report"):
            _info(f"{args.defense} has no report (defenses with one: semantic_ae, plain_ae, "
                  "aae_detector, srd)")
            return 0
        out = Path(args.out or f"runs/fit/{args.defense}")
        out.mkdir(parents=True, exist_ok=True)
        from bench.data import load_eval

        twin = None
        twin_name = getattr(defense, "report_twin", None)
        if twin_name:  # e.g. the plain AE a semantic AE is compared with: same options
            _info(f"the report compares with {twin_name} (fitted once, then cached)")
            twin, _ = prepare_defense(twin_name, options, dataset=args.dataset,
                                      dataset_options=ds_opts, device=device,
                                      preset=args.preset, progress=True, log=_info)
        data = load_eval(args.dataset, args.report_n, **ds_opts)
        rep = defense.report(data, out, twin=twin)
        import json

        (out / "report.json").write_text(json.dumps(rep, indent=2, default=str))
        print(json.dumps(rep, indent=2, default=str))
        _info(f"report written to {out / 'report.json'}"
              + (f"; figures {', '.join(rep['figures'])}" if rep.get("figures") else ""))
    return 0


def _info(msg: str) -> None:
    print(f"robustmatrix: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    handlers = {"run": cmd_run, "list": cmd_list, "leaderboard": cmd_leaderboard, "fit": cmd_fit}
    from bench.submit import handlers as submission_handlers

    handlers.update(submission_handlers())
    try:
        return handlers[args.command](args)
    except _expected_errors() as exc:
        from bench.config import one_line

        print(f"robustmatrix: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or a read-only run directory while writing files
        import errno

        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        from bench.config import one_line

        print(f"robustmatrix: error: {one_line(exc)}; is the disk full or the run directory "
              "read-only? Finished batches are stored: fix it and run the same command again "
              "to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robustmatrix: interrupted; finished batches are stored, run the same command "
              "again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
