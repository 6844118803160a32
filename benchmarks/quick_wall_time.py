"""End-to-end wall time of the quick preset (the README's default) on this machine.

    python benchmarks/quick_wall_time.py [--cold] [--warm] [--rounds 1]

* warm: ``robustmatrix run quick`` in a fresh run directory with the usual cache (decoded data)
  already filled;
* cold: the same with ``ROBUSTMATRIX_CACHE`` pointing at a new empty folder, so the run also
  decodes the CIFAR-10 test split again (the first run after install; the quick preset's
  classifier is the pinned akamaster ResNet-20, so nothing is trained).

Both are reported as wall time AND as CPU time (user + system of the process); on a machine
shared with other work the wall time is inflated, while CPU time / cores is what the wall time
would be on an idle machine when the run keeps every core busy (an optimistic bound: any
serial part runs on one core). Target: < 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from _common import machine, run_cli, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cold", action="store_true", help="only the cold-cache run")
    ap.add_argument("--warm", action="store_true", help="only the warm-cache run")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    kinds = ["warm", "cold"] if args.cold == args.warm else (["cold"] if args.cold else ["warm"])
    tmp = Path(tempfile.mkdtemp(prefix="rm-quick-"))
    cores = os.cpu_count() or 1
    res: dict = {"cores": cores, "runs": {k: [] for k in kinds}}
    print(f"machine: {machine()}")
    if "warm" in kinds:  # make sure the usual cache is warm (a no-op when it already is)
        run_cli(["run", "quick", "--run-dir", str(tmp / "warmup"), "--n", "10", "--no-progress"])
    for r in range(args.rounds):
        for kind in kinds:
            env = {"ROBUSTMATRIX_CACHE": str(tmp / f"cache-{r}")} if kind == "cold" else {}
            out = run_cli(["run", "quick", "--run-dir", str(tmp / f"{kind}-{r}"), "--no-progress"],
                          env=env)
            res["runs"][kind].append(out)
            print(f"  {kind} cache: {out['wall']:.1f} s wall ({out['wall'] / 60:.2f} min), "
                  f"{out['cpu']:.1f} s CPU -> {out['cpu'] / cores / 60:.2f} min on {cores} idle "
                  f"cores   target < 10 min", flush=True)
            shutil.rmtree(tmp / f"cache-{r}", ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"figures written to {write_result('quick_wall_time', res)}")


if __name__ == "__main__":
    main()
