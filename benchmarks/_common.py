"""Shared helpers for the performance scripts: side-by-side, interleaved, repeated timings.

Every script compares things IN ONE PROCESS, alternating them (A B A B ...) so that load from
other processes on a shared machine hits both alike, and reports the median of the per-round
ratios (plus the spread) rather than absolute times.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).absolute().parent.parent
if importlib.util.find_spec("bench") is None:  # not installed: `python benchmarks/x.py`
    sys.path.insert(0, str(REPO))


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, *, warmup: int = 1,
                log: Callable[[str], None] = print, cpu: dict[str, list[float]] | None = None
                ) -> dict[str, list[float]]:
    """Run every function once per round, in rotating order; return the wall times per
    function (and fill ``cpu`` with this process's CPU times, all threads, when given)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    cpus: dict[str, list[float]] = cpu if cpu is not None else {}
    for n in names:
        cpus[n] = []
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            c0 = time.process_time()
            t, _ = timed(fns[n])
            cpus[n].append(time.process_time() - c0)
            times[n].append(t)
        log(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {times[n][-1]:.2f} s ({cpus[n][-1]:.2f} CPU)" for n in names))
    return times


def ratio_stats(num: list[float], den: list[float]) -> dict[str, float]:
    """Median and range of the per-round ratios num/den (rounds paired by index)."""
    rs = [a / b for a, b in zip(num, den)]
    return {"median": statistics.median(rs), "min": min(rs), "max": max(rs), "rounds": len(rs)}


def fmt_ratio(name: str, st: dict[str, float], target: str = "") -> str:
    t = f"   target {target}" if target else ""
    return (f"{name}: {st['median']:.3f} (median of {st['rounds']} rounds, range "
            f"{st['min']:.3f}-{st['max']:.3f}){t}")


def machine() -> dict[str, object]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None}


def write_result(name: str, result: dict) -> Path:
    """Also keep the figures as JSON (runs/benchmarks/<name>.json) for docs/performance.md."""
    out = REPO / "runs" / "benchmarks"  # runs/ is git-ignored
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2, default=str))
    return path


def run_cli(args: list[str], *, env: dict | None = None, cwd: Path | None = None,
            check: bool = True) -> dict[str, float]:
    """Run ``robustmatrix ARGS`` in a subprocess; wall time and its CPU time (user + system).

    CPU time / cores is what the wall time would be on an otherwise idle machine when the run
    keeps every core busy, a load-independent companion to the wall time on a shared machine.
    """
    import resource
    import subprocess

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    # a neutral working directory: `-m` puts it first on sys.path, and the installed (or
    # PYTHONPATH) robustmatrix must be the one measured
    p = subprocess.run([sys.executable, "-m", "bench", *args], env={**os.environ, **(env or {})},
                       cwd=cwd or tempfile.gettempdir(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if check and p.returncode != 0:
        raise RuntimeError(f"robustmatrix {' '.join(args)} failed ({p.returncode}):\n"
                           f"{p.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "returncode": p.returncode, "stderr_tail": p.stderr[-500:]}
