"""Attack throughput: forward+backward passes per second inside a PGD cell vs a raw
forward+backward loop of the same model at the same batch size.

    python benchmarks/attack_throughput.py [--rounds 5] [--steps 10] [--n 100]

The PGD cell is :func:`bench.harness.scoring.attack_batch` with the registered ``pgd`` attack
(torchattacks PGD under the harness's pass-counting tracer, then the epsilon check and the fp32
re-scoring); its rate is (batch-level backward passes the tracer counted) / (the cell's wall time),
so the harness's extra forwards (PGD's success check, re-scoring) count AGAINST it. The raw loop
does ``steps`` x (forward, cross-entropy, ``torch.autograd.grad`` w.r.t. the input) and nothing
else.

Target: cell rate / raw rate >= 0.9.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _common import fmt_ratio, interleaved, ratio_stats, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: least disturbed by other load on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from harness_overhead import setup

    from bench.core.config import ComponentSpec
    from bench.harness.planning import create_attack
    from bench.harness.scoring import attack_batch, score

    data, defense, _, _, what = setup(args.n)
    x, y = data.images, data.labels
    eps = 8 / 255
    clean = score(defense, x, y, draws=5, seed=0)
    attack = create_attack(ComponentSpec("pgd", {"steps": args.steps}), "linf", seed=0)
    passes = {}

    def cell():
        _, _, rec = attack_batch(defense, attack, x, y, eps, clean=clean, seed=0, draws=5)
        passes["cell_backward"] = rec["backward_passes"] / len(y)
        passes["cell_forward"] = rec["forward_passes"] / len(y)

    def raw():
        xa = x.clone()
        for _ in range(args.steps):
            xa.requires_grad_(True)
            loss = F.cross_entropy(defense(xa), y)
            (g,) = torch.autograd.grad(loss, xa)
            xa = xa.detach()
        return g

    print(f"{what}: batch {len(y)}, PGD-{args.steps}, torch threads {torch.get_num_threads()}")
    cpu: dict[str, list[float]] = {}
    times = interleaved({"pgd_cell": cell, "raw_loop": raw}, args.rounds, cpu=cpu)
    cell_rate = [passes["cell_backward"] / t for t in times["pgd_cell"]]
    raw_rate = [args.steps / t for t in times["raw_loop"]]
    st = ratio_stats(cell_rate, raw_rate)
    st_cpu = ratio_stats([passes["cell_backward"] / t for t in cpu["pgd_cell"]],
                         [args.steps / t for t in cpu["raw_loop"]])
    print(f"passes per batch in the cell: {passes['cell_forward']:.0f} forward, "
          f"{passes['cell_backward']:.0f} backward (raw loop: {args.steps} + {args.steps})")
    print(f"median rates: cell {sorted(cell_rate)[len(cell_rate) // 2]:.3f}, raw "
          f"{sorted(raw_rate)[len(raw_rate) // 2]:.3f} forward+backward passes/s (batch {len(y)})")
    print(fmt_ratio("cell rate / raw rate, wall time", st, ">= 0.9"))
    print(fmt_ratio("cell rate / raw rate, CPU time", st_cpu, ">= 0.9"))
    path = write_result("attack_throughput", {"setup": what, "steps": args.steps, "times": times,
                                              "cpu_times": cpu, "passes": passes, "cell/raw": st,
                                              "cell/raw_cpu": st_cpu})
    print(f"figures written to {path}")


if __name__ == "__main__":
    main()
