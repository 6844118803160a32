"""``schedule: worst-case`` (each attack only on the samples every earlier attack left
unbroken, AutoAttack-style) vs ``schedule: full`` (every attack on every sample).

    python benchmarks/worst_case_schedule.py [--matrix quick] [--n 100] [--rounds 1]

Both schedules run in-process in fresh run directories, alternating. Reported: the forward and
backward passes of the attacked cells (from the store), the wall time of the runs, their
ratios, and whether the worst-case robust accuracy (the headline number) of every
(dataset, threat, epsilon, defense) is identical (it must be).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--matrix", default="quick")
    ap.add_argument("--n", type=int, help="examples per dataset [the matrix's]")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()

    from bench.core.config import load_config
    from bench.core.store import ResultStore
    from bench.harness.runner import MatrixRunner
    from leaderboard.table import build_records

    tmp = Path(tempfile.mkdtemp(prefix="rm-schedule-"))
    out: dict[str, dict] = {s: {"wall": [], "cpu": [], "cell_wall": [], "fwd": None,
                                "bwd": None, "worst": None}
                            for s in ("full", "worst-case")}
    for r in range(args.rounds):
        order = ["full", "worst-case"] if r % 2 == 0 else ["worst-case", "full"]
        for sched in order:
            cfg = load_config(args.matrix)
            cfg.schedule = sched
            if args.n:
                for d in cfg.datasets:
                    d.n = args.n
            cfg.run_dir = str(tmp / f"{sched}-{r}")
            t0, c0 = time.perf_counter(), time.process_time()
            MatrixRunner(cfg, progress=False, log=lambda m: None).run()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            store = ResultStore(Path(cfg.run_dir) / "results.sqlite")
            cells = [c for c in store.cells() if c.attack != "clean"]
            fwd = sum(c.forward_passes or 0 for c in cells)
            bwd = sum(c.backward_passes or 0 for c in cells)
            worst = {(x["dataset"], x["threat"], round(x["eps"], 8), x["defense"]):
                     (x["worst_case"]["k"] if "k" in x["worst_case"]
                      else x["worst_case"]["accuracy"])
                     for x in build_records(store)}
            o = out[sched]
            o["wall"].append(wall)
            o["cpu"].append(cpu)
            o["cell_wall"].append(sum(c.wall_time or 0 for c in cells))
            o["fwd"], o["bwd"], o["worst"] = fwd, bwd, worst
            o["per_cell"] = {f"{c.attack} {c.threat} {c.eps:.4g}": c.forward_passes for c in cells}
            print(f"  {sched:10s} round {r + 1}: {wall:7.1f} s wall, {cpu:7.1f} s CPU, "
                  f"{o['cell_wall'][-1]:7.1f} s in attacked cells; {fwd} forward / {bwd} "
                  "backward sample-passes in attacked cells", flush=True)
    f, w = out["full"], out["worst-case"]
    equal = f["worst"] == w["worst"]
    res = {"matrix": args.matrix, "n": args.n, "full": f, "worst_case": w,
           "passes_ratio_forward": w["fwd"] / max(f["fwd"], 1),
           "passes_ratio_backward": w["bwd"] / max(f["bwd"], 1),
           "time_ratio": statistics.median(w["wall"]) / statistics.median(f["wall"]),
           "cpu_ratio": statistics.median(w["cpu"]) / statistics.median(f["cpu"]),
           "attacked_cell_time_ratio": statistics.median(w["cell_wall"])
           / statistics.median(f["cell_wall"]),
           "worst_case_equal": equal}
    print(f"worst-case / full: forward passes {res['passes_ratio_forward']:.3f}, backward passes "
          f"{res['passes_ratio_backward']:.3f}, wall time {res['time_ratio']:.3f}, CPU time "
          f"{res['cpu_ratio']:.3f}, time in attacked cells {res['attacked_cell_time_ratio']:.3f}")
    print(f"worst-case robust accuracy identical under both schedules: {equal}")
    for k in sorted(f["worst"]):
        print(f"  {k}: full {f['worst'][k]}, worst-case {w['worst'].get(k)}")
    res["full"]["worst"] = {" | ".join(map(str, k)): v for k, v in f["worst"].items()}
    res["worst_case"]["worst"] = {" | ".join(map(str, k)): v for k, v in w["worst"].items()}
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"figures written to {write_result('worst_case_schedule', res)}")


if __name__ == "__main__":
    main()
