"""Cached re-run: running a finished matrix again (every cell reused from the store) vs its
first run.

    python benchmarks/cached_rerun.py [--matrix quick] [--rounds 3]

The first run is ``robustmatrix run MATRIX`` in a fresh run directory (the model and data caches
warm, so this measures the benchmark, not the one-off training); then, alternating, ``rounds``
re-runs through the CLI (process start, imports, tables) and in-process through
``MatrixRunner.run()`` (the harness's own re-run cost: data from the decoded cache, defense
build, defense checks, store look-ups). Target: re-run / first run <= 0.02.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import run_cli, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--matrix", default="quick")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--run-dir", help="[a temporary folder, removed afterwards]")
    args = ap.parse_args()

    from bench.core.config import load_config
    from bench.harness.runner import MatrixRunner

    tmp = Path(tempfile.mkdtemp(prefix="rm-cached-"))
    run_dir = Path(args.run_dir) if args.run_dir else tmp / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cli = ["run", args.matrix, "--run-dir", str(run_dir), "--no-progress"]
    # warm the model/data caches without touching run_dir (a one-off, not measured)
    run_cli(["run", args.matrix, "--run-dir", str(tmp / "warm"), "--no-progress", "--n", "10"])
    print(f"first run of '{args.matrix}' ...", flush=True)
    first = run_cli(cli)
    print(f"  first run: {first['wall']:.1f} s wall, {first['cpu']:.1f} s CPU")
    cfg = load_config(args.matrix)
    cfg.run_dir = str(run_dir)
    cli_re, inproc = [], []
    for r in range(args.rounds):
        cli_re.append(run_cli(cli))
        t0 = time.perf_counter()
        s = MatrixRunner(cfg, progress=False, log=lambda m: None).run()
        inproc.append(time.perf_counter() - t0)
        assert s.cells_computed == 0 and s.batches_computed == 0, s
        print(f"  round {r + 1}: CLI re-run {cli_re[-1]['wall']:.2f} s wall "
              f"({cli_re[-1]['cpu']:.2f} s CPU), in-process re-run {inproc[-1]:.2f} s")
    med_cli = statistics.median(c["wall"] for c in cli_re)
    med_cli_cpu = statistics.median(c["cpu"] for c in cli_re)
    med_in = statistics.median(inproc)
    res = {"matrix": args.matrix, "first": first, "cli_reruns": cli_re, "inprocess_reruns": inproc,
           "cli/first_wall": med_cli / first["wall"], "cli/first_cpu": med_cli_cpu / first["cpu"],
           "inprocess/first_wall": med_in / first["wall"]}
    print(f"CLI re-run / first run: {res['cli/first_wall']:.4f} wall, {res['cli/first_cpu']:.4f} "
          "CPU   target <= 0.02")
    print(f"in-process re-run / first run: {res['inprocess/first_wall']:.4f} wall")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"figures written to {write_result('cached_rerun', res)}")


if __name__ == "__main__":
    main()
