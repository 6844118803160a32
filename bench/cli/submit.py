"""``robustmatrix submit``: evaluate a user's defense with one command and write its entries
(docs/submitting.md); the work is :func:`bench.harness.submission.submit.submit`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.cli.errors import info
from bench.harness.submission.load import SubmitError
from bench.harness.submission.submit import SubmitResult, submit
from bench.harness.submission.suites import SUITES, Metadata, SubmitOptions
from bench.harness.submission.sweep import parse_eps_list, run_sweep, sweep_attack_for


def describe(result: SubmitResult | dict) -> str:
    entries = result["entries"] if isinstance(result, dict) else result.entries
    lines = [f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} written:"]
    for p in entries:
        e = json.loads(Path(p).read_text())
        lines.append(f"  {p}  clean {100 * e['clean']['accuracy']:.1f}%  worst case "
                     f"{100 * e['worst_case']['accuracy']:.1f}% "
                     f"[{100 * e['worst_case']['ci_low']:.0f}, "
                     f"{100 * e['worst_case']['ci_high']:.0f}]  flags: "
                     f"{', '.join(dict.fromkeys(f['code'] for f in e['flags'])) or '-'}")
    return "\n".join(lines)


# the command line ------------------------------------------------------------------------------
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


def _kv(pairs: list[str]) -> dict[str, Any]:
    """``--option KEY=VALUE`` pairs: safe YAML values, numeric options bounded."""
    from bench.core.config import parse_options

    return parse_options(pairs)


def _threats_from_args(args: Any) -> dict[str, list[float]]:
    from bench.core.config import THREATS, ConfigError, parse_eps

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
    from bench.core.config import _int

    return _int(value, where, lo, hi)


def run(args: Any) -> int:
    from bench.harness.validate import ValidationError

    log = info
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
    if args.no_isolation:
        try:
            result = submit(args.defense, meta, opts, log=log)
        except ValidationError as exc:
            raise SubmitError(str(exc)) from None
        entries, wall = [str(p) for p in result.entries], result.wall_time
    else:
        entries, wall = _submit_in_child(args, meta, opts)
    if sweep:
        first = (opts.attacks or [None])[0] or SUITES[opts.suite]["attacks"][0]
        for p in entries:
            if args.no_isolation:
                run_sweep(p, sweep, attack=sweep_attack_for(first), progress=opts.progress,
                          log=log)
            else:  # the sweep re-runs the submitted code: isolated like the submission
                from bench.harness.submission.sandbox import sweep_isolated

                limit, memory = isolation_limits(args, default_time_limit(opts.suite, opts.n)
                                                 * max(1, len(sweep)))
                unwrap(sweep_isolated(p, sweep, attack=sweep_attack_for(first),
                                      device=opts.device, progress=opts.progress,
                                      timeout=limit, memory_limit=memory,
                                      memory_rlimit="DATA" if str(opts.device).startswith(
                                          "cuda") else "AS"))
    print(describe({"entries": entries}))
    log(f"submitted in {wall:.1f} s; verify with `robustmatrix verify "
        f"{entries[0] if entries else '<entry>'}`")
    return 0


#: errors of the harness itself (a refusal, a bad option): their own line is the message
_EXPECTED = {"SubmitError", "ValidationError", "ConfigError", "RegistryError", "ArtifactError",
             "DataError", "ChecksumError", "CheckpointError", "EntryError", "StoreError"}

#: seconds per evaluated image, by suite, for the default --time-limit (CPU-sized, generous)
SECONDS_PER_IMAGE = {"test": 2.0, "quick": 30.0, "standard": 600.0}


def default_time_limit(suite: str, n: int) -> float:
    """The default wall-clock limit of an isolated submission: 10 minutes to build and fit,
    plus a per-image budget of the suite (``SECONDS_PER_IMAGE``)."""
    return 600.0 + SECONDS_PER_IMAGE.get(suite, 600.0) * n


def isolation_limits(args: Any, default_seconds: float) -> tuple[float, int | None]:
    """``--time-limit`` (default ``default_seconds``) and ``--memory-limit`` of an isolated
    command (submit, verify, sweep), checked: one line for a bad value."""
    from bench.harness.submission.sandbox import parse_size

    if args.time_limit is None:
        limit = float(default_seconds)
    else:
        try:
            limit = float(args.time_limit)
        except ValueError:
            limit = float("nan")
        if not (limit > 0 and limit <= 7 * 86400):
            raise SubmitError(f"--time-limit {args.time_limit!r}: give seconds between 1 and "
                              "604800, e.g. --time-limit 3600")
    mem_text = str(args.memory_limit).strip().lower()
    try:
        memory = None if mem_text in ("none", "unlimited", "0") else parse_size(args.memory_limit)
    except ValueError as exc:
        raise SubmitError(f"--memory-limit: {exc}") from None
    return limit, memory


def unwrap(res: Any) -> Any:
    """The child's value; its own one-line refusal re-raised as such; any abnormal end (an
    exception, a signal, ``os._exit``, a limit hit) a :class:`SandboxError` (one line)."""
    from bench.harness.submission.sandbox import SandboxError

    if res.status == "exception" and res.error_type in _EXPECTED and res.error_message:
        raise SubmitError(res.error_message)  # the harness's own one-line refusal, from the child
    if not res.ok:
        raise SandboxError(res)
    return res.value


def add_isolation_flags(parser: Any, what: str, default: str) -> None:
    parser.add_argument("--time-limit", metavar="SECONDS", help=f"wall-clock limit of the "
                        f"isolated {what} [{default}]")
    parser.add_argument("--memory-limit", default="8GiB", metavar="SIZE",
                        help=f"memory the isolated {what} may add, e.g. 4GiB, or 'none' [8GiB]")
    parser.add_argument("--no-isolation", action="store_true", help=f"run the {what} in this "
                        "process (trusted code only: no time or memory limit)")


def _submit_in_child(args: Any, meta: Metadata, opts: SubmitOptions) -> tuple[list[str], float]:
    """Run the whole submission in a sandboxed child (:func:`submit_isolated`): wall-clock and
    memory limits, no core dumps, its process group killed at the end. Any abnormal end (an
    exception, a signal, ``os._exit``, a limit hit) is a :class:`SandboxError`: one line, exit 2;
    the batches the child committed stay in the store."""
    from bench.harness.submission.sandbox import submit_isolated

    limit, memory = isolation_limits(args, default_time_limit(opts.suite, opts.n))
    res = submit_isolated(args.defense, meta, opts, timeout=limit, memory_limit=memory,
                          memory_rlimit="DATA" if str(opts.device).startswith("cuda") else "AS",
                          label=f"submission {args.defense}")
    unwrap(res)
    value = res.value if isinstance(res.value, dict) else {}
    entries = [str(p) for p in value.get("entries") or []]
    if not entries:
        raise SubmitError(f"submission {args.defense}: the isolated evaluation returned no "
                          "entry; run again with --no-progress to see its log")
    return entries, float(value.get("wall_time") or 0.0)



def add_parser(sub: Any) -> None:
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
    add_isolation_flags(s, "evaluation", "600 + a per-image budget of the suite times --n")
