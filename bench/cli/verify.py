"""``robustmatrix verify ENTRY...``: re-check entries (stored adversarials re-scored, a random
sample of batches re-attacked; :func:`bench.harness.submission.verify.verify_entry`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.cli.errors import info
from bench.harness.submission.verify import verify_entry


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


def run(args: Any) -> int:
    from bench.harness.submission.load import SubmitError

    if not 0 <= args.rerun <= 1000:
        raise SubmitError(f"--rerun {args.rerun}: give a number of batches between 0 and 1000, "
                          "e.g. --rerun 2")
    reports = []
    for path in args.entry:
        rep = verify_entry(path, rerun=args.rerun, seed=args.seed, device=args.device,
                           use_snapshot=args.snapshot, log=info)
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
