"""``robustmatrix verify ENTRY...``: re-check entries (stored adversarials re-scored, a random
sample of batches re-attacked; :func:`bench.harness.submission.verify.verify_entry`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.cli.errors import info
from bench.cli.submit import add_isolation_flags, isolation_limits, unwrap
from bench.harness.submission.verify import VerifyReport, verify_entry


def add_parser(sub: Any) -> None:
    v = sub.add_parser("verify", help="re-check an entry: stored adversarials (sha256) re-scored "
                       "against the defense, a random sample of batches re-attacked")
    v.add_argument("entry", nargs="+", help="entry JSON file(s)")
    v.add_argument("--rerun", type=int, default=2, help="batches to re-attack [2]")
    v.add_argument("--seed", type=int, default=0, help="seed for choosing the batches [0]")
    v.add_argument("--device", default="cpu")
    v.add_argument("--snapshot", action="store_true", help="rebuild the defense from the source "
                   "snapshot taken at submission instead of the current file")
    v.add_argument("--json", help="also write the verification report to this file")
    add_isolation_flags(v, "verification", "600 + 30 s per evaluated image")


def run(args: Any) -> int:
    from bench.harness.submission.load import SubmitError

    if not 0 <= args.rerun <= 1000:
        raise SubmitError(f"--rerun {args.rerun}: give a number of batches between 0 and 1000, "
                          "e.g. --rerun 2")
    reports = []
    for path in args.entry:
        if args.no_isolation:
            rep = verify_entry(path, rerun=args.rerun, seed=args.seed, device=args.device,
                               use_snapshot=args.snapshot, log=info)
        else:  # the entry's defense is submitted code: rebuilt and re-run in a sandboxed child
            rep = _verify_in_child(args, path)
        print(rep.format())
        reports.append(rep)
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_dict() for r in reports], indent=2,
                                              default=str))
    failed = [r for r in reports if not r.ok]
    if failed:
        print(f"robustmatrix: verification FAILED for {len(failed)} of {len(reports)} "
              "entr" + ("y" if len(reports) == 1 else "ies"), file=sys.stderr)
        return 1
    print(f"robustmatrix: {len(reports)} entr{'y' if len(reports) == 1 else 'ies'} verified",
          file=sys.stderr)
    return 0


def _verify_in_child(args: Any, path: str) -> VerifyReport:
    from bench.harness.submission.sandbox import verify_isolated
    from leaderboard.entries import read_entry

    n = int(read_entry(path)["n"])  # read here (a bad file is one line before any child)
    limit, memory = isolation_limits(args, SECONDS_TO_REBUILD + SECONDS_PER_IMAGE * n)
    res = verify_isolated(path, rerun=args.rerun, seed=args.seed, device=args.device,
                          use_snapshot=args.snapshot, timeout=limit, memory_limit=memory,
                          memory_rlimit="DATA" if str(args.device).startswith("cuda") else "AS")
    return VerifyReport.from_dict(unwrap(res))


#: the default --time-limit of an isolated verification: rebuilding the defense, plus a budget
#: per evaluated image (re-scoring everything, re-attacking --rerun batches)
SECONDS_TO_REBUILD = 600.0
SECONDS_PER_IMAGE = 30.0
