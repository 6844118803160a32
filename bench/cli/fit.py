"""``robustmatrix fit DEFENSE``: train a defense's trainable parts (cached by content), and
with ``--report`` measure it (:func:`bench.harness.reports.fit_report`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.cli.errors import info


def add_parser(sub: Any) -> None:
    from bench.core.config import FIT_PRESETS

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


def run(args: argparse.Namespace) -> int:
    import time

    from bench.artifacts import prepare_defense, resolve_device
    from bench.core.config import parse_options
    from bench.core.registry import DEFENSES

    DEFENSES.get(args.defense)
    options: dict[str, Any] = parse_options(args.option)  # safe YAML, bounded numbers
    ds_opts: dict[str, Any] = {}
    if args.resolution:
        ds_opts["resolution"] = args.resolution
    if args.data_root:
        ds_opts["root"] = args.data_root
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    defense, fitted = prepare_defense(args.defense, options, dataset=args.dataset,
                                    dataset_options=ds_opts, device=device, preset=args.preset,
                                    progress=True, log=info)
    took = time.perf_counter() - t0
    if not getattr(defense, "trainable", False):
        info(f"{args.defense} has nothing to fit")
    else:
        state = "fitted" if fitted["fit_seconds"] else "reused cached artifact"
        info(f"{args.defense} on {args.dataset}: {state} in {took:.1f} s -> {fitted['artifact']}")
        if args.ship:
            _ship(args, fitted)
    if args.report:
        from bench.harness.reports import fit_report, has_report, report_twin

        if not has_report(defense):
            info(f"{args.defense} has no report (defenses with one: semantic_ae, plain_ae, "
                  "aae_detector, srd)")
            return 0
        out = Path(args.out or f"runs/fit/{args.defense}")
        out.mkdir(parents=True, exist_ok=True)
        from bench.data import load_eval

        twin = None
        twin_name = report_twin(defense)
        if twin_name:  # e.g. the plain AE a semantic AE is compared with: same options
            info(f"the report compares with {twin_name} (fitted once, then cached)")
            twin, _ = prepare_defense(twin_name, options, dataset=args.dataset,
                                      dataset_options=ds_opts, device=device,
                                      preset=args.preset, progress=True, log=info)
        data = load_eval(args.dataset, args.report_n, **ds_opts)
        rep = fit_report(defense, data, out, twin=twin)
        import json

        (out / "report.json").write_text(json.dumps(rep, indent=2, default=str))
        print(json.dumps(rep, indent=2, default=str))
        info(f"report written to {out / 'report.json'}"
              + (f"; figures {', '.join(rep['figures'])}" if rep.get("figures") else ""))
    return 0


def _ship(args: argparse.Namespace, fitted: dict[str, Any]) -> None:
    from bench.artifacts import SHIPPED_DIR
    from bench.model_card import measured_rows, ship
    from bench.models.checkpoint import sha256_file

    measured = [r for run in args.card_results
                for r in measured_rows(Path(run), args.card_label or args.defense)]
    dest = ship(Path(fitted["artifact"]), name=args.defense, dataset=args.dataset,
                resolution=args.resolution, preset=fitted["preset"],
                dest_dir=Path(args.ship_dir) if args.ship_dir else SHIPPED_DIR,
                measured=measured, source_runs=list(args.card_results))
    info(f"shipped {dest} (model card {dest.with_suffix('.md').name}); pin it in "
         f"bench.artifacts.SHIPPED: ({args.defense!r}, {args.dataset!r}, {args.resolution!r}, "
         f"{fitted['preset']!r}): Shipped({dest.name!r}, {sha256_file(dest)!r})")
