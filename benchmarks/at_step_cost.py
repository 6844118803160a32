"""Cost of one adversarial-training step: PGD-AT (FGSM-RS) vs SPAT, fp32 vs bfloat16 autocast.

Runs the SAME loop (:func:`defenses.spat.adversarial_train`) on one epoch of a fixed batch set
for each variant, interleaved over rounds in one process, and reports seconds per step and the
ratios (machines here are shared and noisy: read the ratios, not the seconds).

    python benchmarks/at_step_cost.py [--arch resnet20] [--steps 8] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.models import create_model
from defenses.spat import adversarial_train

VARIANTS = {
    "pgd fp32": {"method": "pgd", "precision": "fp32"},
    "pgd bf16": {"method": "pgd", "precision": "bf16"},
    "spat(3 classes) bf16": {"method": "spat", "precision": "bf16", "spat_classes": 3},
    "spat(10 classes) bf16": {"method": "spat", "precision": "bf16", "spat_classes": None},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="training steps per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n = args.batch * args.steps
    x = torch.rand(n, 3, args.size, args.size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    eps = 8 / 255
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for _ in range(args.rounds):
        for name, kw in VARIANTS.items():
            model = create_model(args.arch, num_classes=10)
            t0 = time.perf_counter()
            adversarial_train(model, (x, y), eps=eps, steps=1, step_size=1.25 * eps, epochs=1,
                              batch_size=args.batch, progress=False, **kw)
            times[name].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times["pgd bf16"])
    print(f"{args.arch} at {args.size} px, batch {args.batch}, {args.threads} threads, "
          f"median of {args.rounds} rounds of {args.steps} steps")
    print(f"{'variant':24s} {'s/step':>8s} {'x pgd bf16':>10s}")
    for name in VARIANTS:
        med = statistics.median(times[name])
        print(f"{name:24s} {med:8.3f} {med / base:10.2f}")


if __name__ == "__main__":
    main()
