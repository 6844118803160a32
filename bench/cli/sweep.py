"""``robustmatrix sweep ENTRY --eps ...``: robust accuracy over a grid of epsilons for an entry.
"""

from __future__ import annotations

from typing import Any

from bench.cli.errors import info
from bench.cli.submit import _kv, add_isolation_flags, isolation_limits, unwrap
from bench.harness.submission.sweep import SWEEP_ATTACK, parse_eps_list, run_sweep


def run(args: Any) -> int:
    a = {"name": args.attack, **_kv(args.option)}
    if args.attack == "adaptive" and not args.option:
        a = dict(SWEEP_ATTACK)
    eps = parse_eps_list(args.eps)
    if args.no_isolation:
        sw = run_sweep(args.entry, eps, attack=a, device=args.device,
                       progress=not args.no_progress, log=info)
    else:  # the entry's defense is submitted code: attacked in a sandboxed child
        from bench.harness.submission.sandbox import sweep_isolated
        from leaderboard.entries import read_entry

        n = int(read_entry(args.entry)["n"])
        limit, memory = isolation_limits(args, (600.0 + 30.0 * n) * len(eps))
        sw = unwrap(sweep_isolated(args.entry, eps, attack=a, device=args.device,
                                   progress=not args.no_progress, timeout=limit,
                                   memory_limit=memory, memory_rlimit="DATA" if str(
                                       args.device).startswith("cuda") else "AS"))
    for p in sw["points"]:
        print(f"eps {p['eps']:.4g}: robust {100 * p['worst_case']['accuracy']:.1f}% "
              f"[{100 * p['worst_case']['ci_low']:.0f}, {100 * p['worst_case']['ci_high']:.0f}]")
    return 0


def add_parser(sub: Any) -> None:
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
    add_isolation_flags(w, "sweep", "(600 + 30 s per image) per epsilon")
