"""The Ray executor with 2 workers vs the local executor, on the smoke and quick matrices.

    python benchmarks/ray_vs_local.py [--matrices smoke quick] [--rounds 1] [--smoke-rounds 7]

One local Ray instance (``ray.init(num_cpus=2)``) is started once and kept warm (a first
unmeasured run starts the workers and imports torch in them); then, per matrix and round,
alternating, a local run and a Ray run in fresh run directories. Reported per matrix:

* speed-up = local wall time / Ray wall time (median of the paired rounds);
* overhead per task: for each Ray task, (submission to result in the driver) minus (the worker's
  compute time), median over tasks: dispatch, argument and result transfer, the first
  deserialisation of the defense on each worker. Measured with at most 2 tasks in flight (one
  per worker) so no task waits in a queue;
* that the two stores hold identical per-sample rows (the executor is not an input).

``--threads``: torch threads per Ray task. The default of the executor on a CPU is the driver's
thread count (bit-identical results to a local run); 2 workers x 2 threads oversubscribe 2
cores, so the script also measures ``threads: 1`` (results then differ in the last float bits).
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from _common import write_result


def rows(run_dir: Path) -> dict:
    con = sqlite3.connect(run_dir / "results.sqlite")
    return {k: con.execute("SELECT * FROM samples WHERE cell_key=? ORDER BY idx", (k,)).fetchall()
            for (k,) in con.execute("SELECT key FROM cells")}


def transfer_cost(ray, matrix: str, rounds: int = 5) -> dict[str, float]:
    """Seconds to get the matrix's (first) defense onto a worker: ``put`` (driver: pickle into
    the object store; worker: fetch and unpickle) vs ``rebuild`` (worker: registry build and
    artifact/checkpoint load from the shared cache), medians over ``rounds``, alternating."""
    from bench.artifacts import prepare_defense
    from bench.core.config import load_config
    from bench.harness.executors import CellJob, RayExecutor, _worker_defense

    cfg = load_config(matrix)
    de, ds = cfg.defenses[0], cfg.datasets[0]
    defense, _ = prepare_defense(de.name, de.options, dataset=ds.name, dataset_options=ds.options,
                                 preset=cfg.fit_preset, log=lambda m: None)
    recipe = {"name": de.name, "options": de.options, "dataset": ds.name,
              "dataset_options": ds.options, "preset": cfg.fit_preset}

    @ray.remote(num_cpus=1)
    def fetch(handle):
        t = time.perf_counter()
        _worker_defense(handle)
        return time.perf_counter() - t

    out: dict[str, list[float]] = {"put_driver": [], "put_worker": [], "rebuild_worker": []}
    for _ in range(rounds):
        for mode in ("put", "rebuild"):
            ex = RayExecutor(device="cpu", defense_transfer=mode, threads=1)
            ex.start()
            job = CellJob("k", "k", defense, None, 0.0, 0, 1, defense.fingerprint(), recipe)
            t = time.perf_counter()
            handle = ex._handle(job)  # a new token: the worker's cache misses
            if mode == "put":
                out["put_driver"].append(time.perf_counter() - t)
            out[f"{mode}_worker"].append(ray.get(fetch.remote(handle)))
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--matrices", nargs="+", default=["smoke", "quick"])
    ap.add_argument("--rounds", type=int, default=1, help="rounds for the quick matrix")
    ap.add_argument("--smoke-rounds", type=int, default=7, help="rounds for the smoke matrix")
    ap.add_argument("--threads", type=int, nargs="+", default=[0, 1],
                    help="torch threads per Ray task on smoke (0: the executor's default)")
    ap.add_argument("--quick-threads", type=int, nargs="+", default=[1],
                    help="the same on quick (each setting costs two quick runs per round)")
    args = ap.parse_args()

    import ray
    import torch

    from bench.core.config import load_config
    from bench.harness.runner import MatrixRunner

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t_init = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(prefix="rm-ray-"))

    @ray.remote(num_cpus=1)
    def noop(x):
        return x

    ray.get([noop.remote(0) for _ in range(4)])
    lat = []
    for _ in range(20):
        t = time.perf_counter()
        ray.get(noop.remote(0))
        lat.append(time.perf_counter() - t)
    print(f"ray.init: {t_init:.1f} s; empty task round trip: {1000 * statistics.median(lat):.1f} ms"
          f"; driver torch threads {torch.get_num_threads()}")

    def run(matrix: str, executor: str, threads: int, tag: str):
        cfg = load_config(matrix)
        cfg.run_dir = str(tmp / tag)
        if executor == "ray":
            cfg.executor = "ray"
            cfg.executor_options = {"max_in_flight": 2, **({"threads": threads} if threads else {})}
        runner = MatrixRunner(cfg, progress=False, log=lambda m: None)
        t = time.perf_counter()
        s = runner.run()
        wall = time.perf_counter() - t
        times = getattr(runner.executor, "task_times", [])
        return wall, s, times

    # warm the workers and this process (imports, caches) once, unmeasured
    run("smoke", "ray", 0, "warm-ray")
    run("smoke", "local", 0, "warm-local")
    result: dict = {"ray_init_s": t_init, "empty_task_ms": 1000 * statistics.median(lat),
                    "matrices": {}, "defense_transfer": {}}
    for matrix in args.matrices:
        tc = transfer_cost(ray, matrix)
        result["defense_transfer"][matrix] = tc
        print(f"defense to a worker ({matrix}): put {tc['put_driver']:.3f} s in the driver + "
              f"{tc['put_worker']:.3f} s in the worker; rebuild {tc['rebuild_worker']:.3f} s in "
              "the worker", flush=True)
    for matrix in args.matrices:
        for threads in (args.threads if matrix == "smoke" else args.quick_threads):
            label = f"{matrix} threads={threads or 'default'}"
            walls: dict[str, list[float]] = {"local": [], "ray": []}
            overhead, same = [], True
            rounds = args.smoke_rounds if matrix == "smoke" else args.rounds
            for r in range(rounds):
                order = ["local", "ray"] if r % 2 == 0 else ["ray", "local"]
                dirs = {}
                for ex in order:
                    tag = f"{matrix}-{threads}-{ex}-{r}"
                    wall, s, times = run(matrix, ex, threads, tag)
                    walls[ex].append(wall)
                    dirs[ex] = tmp / tag
                    overhead += [t["latency"] - t["compute"] for t in times]
                    print(f"  {label} round {r + 1} {ex:5s}: {wall:7.1f} s "
                          f"({s.batches_computed} batches)", flush=True)
                same &= rows(dirs["local"]) == rows(dirs["ray"])
            speedups = [a / b for a, b in zip(walls["local"], walls["ray"])]
            res = {"walls": walls, "speedup_median": statistics.median(speedups),
                   "speedups": speedups,
                   "overhead_per_task_s": statistics.median(overhead) if overhead else None,
                   "tasks_per_run": len(overhead) // max(rounds, 1),
                   "identical_rows": same}
            result["matrices"][label] = res
            ov = res["overhead_per_task_s"]
            print(f"{label}: speed-up local/ray {res['speedup_median']:.2f} "
                  f"(rounds {', '.join(f'{x:.2f}' for x in speedups)}), overhead per task "
                  f"{ov if ov is None else f'{ov:.2f} s'} over {res['tasks_per_run']} tasks/run, "
                  f"identical rows: {same}", flush=True)
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"figures written to {write_result('ray_vs_local', result)}")


if __name__ == "__main__":
    main()
