"""Extra cost of the default sanity checks (DEFAULT_CHECKS in bench/core/config.py) on the
`quick` preset: `robustmatrix run` of the preset as shipped against the same preset with
``checks: {defaults: false}``, side by side in one process (interleaved rounds), as a ratio.

    python benchmarks/default_checks_cost.py [--n 500] [--rounds 1]

Both wall time and CPU time (user + system) are reported; on a machine shared with other work
the CPU-time ratio is the load-independent figure. Target: at most 1.3x.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import yaml
from _common import machine, run_cli, write_result

PRESET = Path(__file__).resolve().parents[1] / "bench" / "presets" / "quick.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default=None, help="images (default: the preset's)")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rm-checks-"))
    base = yaml.safe_load(PRESET.read_text())
    configs = {}
    for kind, checks in (("with_checks", None), ("without_checks", {"defaults": False})):
        cfg = dict(base, name=f"quick-{kind}")
        if checks is not None:
            cfg["checks"] = checks
        configs[kind] = tmp / f"{kind}.yaml"
        configs[kind].write_text(yaml.safe_dump(cfg))
    extra = ["--n", str(args.n)] if args.n else []
    print(f"machine: {machine()}")
    run_cli(["run", str(configs["without_checks"]), "--run-dir", str(tmp / "warmup"), "--n", "10",
             "--no-progress"])  # data cache and weights in place before timing
    res: dict = {"n": args.n or base["datasets"][0].get("n"), "runs": {k: [] for k in configs}}
    for r in range(args.rounds):
        for kind, path in configs.items():
            out = run_cli(["run", str(path), "--run-dir", str(tmp / f"{kind}-{r}"), *extra,
                           "--no-progress"])
            res["runs"][kind].append(out)
            print(f"  {kind}: {out['wall']:.1f} s wall, {out['cpu']:.1f} s CPU", flush=True)
    w = {k: sum(o["wall"] for o in v) for k, v in res["runs"].items()}
    c = {k: sum(o["cpu"] for o in v) for k, v in res["runs"].items()}
    res["ratio_wall"] = w["with_checks"] / w["without_checks"]
    res["ratio_cpu"] = c["with_checks"] / c["without_checks"]
    print(f"default checks cost: {res['ratio_wall']:.2f}x wall, {res['ratio_cpu']:.2f}x CPU "
          "(target <= 1.3x)")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"figures written to {write_result('default_checks_cost', res)}")


if __name__ == "__main__":
    main()
