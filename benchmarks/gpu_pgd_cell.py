"""A PGD-10 cell on the CIFAR-10 test set with PreAct ResNet-18, and the fraction of the device's
peak it reaches (issue 6's GPU figure). Runs on a CPU too (use a small ``--n`` there).

    python benchmarks/gpu_pgd_cell.py                        # CUDA when present, 10,000 images
    python benchmarks/gpu_pgd_cell.py --device cpu --n 256 --batch-size 128 --rounds 1
    python benchmarks/gpu_pgd_cell.py --amp bf16 --channels-last on

Measured in one process, alternating (A B A B ...):

* ``cell``: the harness's batch step (:func:`bench.harness.runner.attack_batch` with the registered
  ``pgd`` attack, 10 steps, Linf 8/255) over every batch of the test set, data on the device,
  through :func:`bench.harness.executors.attack_view` (autocast / channels-last as asked);
* ``raw``: 10 x (forward, cross-entropy, gradient w.r.t. the input) per batch and nothing else.

Reported: images/s for both, their ratio, and the model FLOPs the cell performs per second
(``torch.utils.flop_counter`` counts one forward per sample; a backward to the input and weights
is counted as 2 forwards) against two limits: the dense matmul rate this device reaches in the
same process (a large ``torch.mm`` in the cell's dtype: the machine's own limit) and, on CUDA,
the vendor's datasheet peak for known devices (H100 SXM / H200: 989 TFLOP/s dense bf16/fp16,
494 TF32, 67 fp32 without tensor cores). The weights are random: timing does not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _common import fmt_ratio, interleaved, machine, ratio_stats, write_result

#: dense datasheet peaks, TFLOP/s, by (device-name fragment, dtype); fp32 without tensor cores
DATASHEET = {("H100", "bf16"): 989.0, ("H100", "fp16"): 989.0, ("H100", "tf32"): 494.0,
             ("H100", "fp32"): 67.0, ("H200", "bf16"): 989.0, ("H200", "fp16"): 989.0,
             ("H200", "tf32"): 494.0, ("H200", "fp32"): 67.0, ("A100", "bf16"): 312.0,
             ("A100", "fp16"): 312.0, ("A100", "tf32"): 156.0, ("A100", "fp32"): 19.5}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, size: int, reps: int = 10) -> float:
    """TFLOP/s of a square matmul in ``dtype`` on ``device`` (best of ``reps``)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    ap.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions (CUDA)")
    args = ap.parse_args()

    from bench.core.config import ComponentSpec
    from bench.data import load_eval
    from bench.harness.executors import Acceleration, attack_view
    from bench.harness.planning import create_attack
    from bench.harness.scoring import attack_batch, score
    from bench.models import create_model
    from defenses.undefended import Undefended

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        data = load_eval("cifar10", args.n)
        what = f"CIFAR-10 test, {len(data.labels)} images"
    except Exception as exc:  # noqa: BLE001 - no local tree and no download: same-shape noise
        print(f"(CIFAR-10 unavailable: {exc}; random images of the same shape)")
        g = torch.Generator().manual_seed(0)
        data = None
        what = f"random 32x32 images, {args.n}"
    x_all = (data.images if data is not None
             else torch.rand(args.n, 3, 32, 32, generator=g)).to(device)
    y_all = (data.labels if data is not None
             else torch.randint(0, 10, (args.n,), generator=g)).to(device)
    model = create_model("preact_resnet18", num_classes=10)
    defense = Undefended(classifier=model).to(device).eval()
    cl = device.startswith("cuda") if args.channels_last == "auto" else args.channels_last == "on"
    amp = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    view = attack_view(defense, Acceleration(amp=amp, channels_last=cl), log=print)
    attack = create_attack(ComponentSpec("pgd", {"steps": args.steps}), "linf", seed=0)
    eps = 8 / 255
    bs = args.batch_size
    batches = [(x_all[i:i + bs], y_all[i:i + bs]) for i in range(0, len(y_all), bs)]
    cleans = [score(defense, xb, yb, draws=1, seed=0) for xb, yb in batches]

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            defense(x_all[:1])
    fwd_flops = fc.get_total_flops()  # per sample
    passes = {"forward": 0, "backward": 0}

    def cell():
        passes["forward"] = passes["backward"] = 0
        for (xb, yb), clean in zip(batches, cleans):
            _, _, rec = attack_batch(defense, attack, xb, yb, eps, clean=clean, seed=0, draws=1,
                                     attack_model=view)
            passes["forward"] += rec["forward_passes"]
            passes["backward"] += rec["backward_passes"]
        sync(device)

    def raw():
        for xb, yb in batches:
            xa = xb.clone()
            for _ in range(args.steps):
                xa.requires_grad_(True)
                (g,) = torch.autograd.grad(F.cross_entropy(view(xa), yb), xa)
                xa = (xa.detach() + eps / 4 * g.sign()).clamp(0, 1)
        sync(device)

    dtype_name = args.amp if amp is not None else (
        "tf32" if args.tf32 and device.startswith("cuda") else "fp32")
    print(f"{what}; PreAct ResNet-18 ({fwd_flops / 1e6:.0f} MFLOP per forward), PGD-{args.steps}, "
          f"batch {bs}, device {device}, {dtype_name}, channels-last {cl}")
    times = interleaved({"cell": cell, "raw": raw}, args.rounds)
    n = len(y_all)
    cell_t, raw_t = statistics.median(times["cell"]), statistics.median(times["raw"])
    # the tracer counts sample-passes (a pass over a batch of b images counts b)
    fwd_samples, bwd_samples = passes["forward"], passes["backward"]
    flops = (fwd_samples + 2 * bwd_samples) * fwd_flops
    achieved = flops / cell_t / 1e12
    mm_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype_name, torch.float32)
    limit = matmul_peak(device, mm_dtype, 8192 if device.startswith("cuda") else 2048)
    sheet = None
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(0)
        sheet = next((v for (k, d), v in DATASHEET.items() if k in name and d == dtype_name), None)
    st = ratio_stats([n / t for t in times["cell"]], [n / t for t in times["raw"]])
    print(f"cell: {n / cell_t:.0f} images/s ({cell_t:.2f} s for the set), raw loop: "
          f"{n / raw_t:.0f} images/s ({raw_t:.2f} s)")
    print(fmt_ratio("cell / raw throughput", st, ">= 0.9"))
    print(f"model compute in the cell: {achieved:.2f} TFLOP/s; dense matmul on this device in "
          f"{dtype_name}: {limit:.2f} TFLOP/s -> {achieved / limit:.1%} of the measured limit"
          + (f"; datasheet {sheet:.0f} TFLOP/s -> {achieved / sheet:.1%}" if sheet else ""))
    path = write_result("gpu_pgd_cell", {
        "setup": what, "device": device, "dtype": dtype_name, "channels_last": cl,
        "batch_size": bs, "steps": args.steps, "times": times, "cell/raw": st,
        "forward_flops_per_sample": fwd_flops, "sample_passes": [fwd_samples, bwd_samples],
        "achieved_tflops": achieved, "matmul_tflops": limit, "datasheet_tflops": sheet,
        "machine": machine()})
    print(f"figures written to {path}")


if __name__ == "__main__":
    main()
