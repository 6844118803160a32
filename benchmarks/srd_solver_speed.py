"""SRD's sparse coding: the batched torch FISTA solver vs SPORCO's ADMM ConvBPDN, side by side.

Both solve the same convolutional BPDN problem (the SRD purification step) on the SAME
high-frequency images with the SAME dictionary, in one process; both solutions are scored by
the same function (:func:`defenses.sparse_coding.cbpdn_objective`). Prints the wall time of
each, the speed ratio (SPORCO time / torch time) and the objectives with their relative
difference.

    PYTHONPATH=. python benchmarks/srd_solver_speed.py            # CIFAR-10 images if present
    PYTHONPATH=. python benchmarks/srd_solver_speed.py --images 64 --iterations 200 --threads 2

Images: the first ``--images`` of the lossless CIFAR-10 test CSV in the shared data folder (or
the CIFAR-10 test split through ``bench.data``), else synthetic ``test_tiny`` images resized to
``--size``. Dictionary: learned on other images' high bands with the torch learner (a few
iterations: a realistic, data-adapted dictionary) unless ``--random-dictionary``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from defenses.sparse_coding import (  # noqa: E402
    cbpdn_objective,
    conv_bpdn,
    learn_conv_dictionary,
    normalise_filters,
    sporco_conv_bpdn,
    tikhonov_split,
)


def load_images(n: int, size: int) -> tuple[torch.Tensor, str]:
    """2n images in [0, 1]: n to sparse-code, n to learn the dictionary on."""
    try:
        from bench.data import load_eval

        data = load_eval("cifar10", 2 * n, seed=0)
        return data.images, f"cifar10 test ({data.source})"
    except Exception:  # noqa: BLE001 - any missing data falls back to synthetic images
        from bench.data import load_eval

        data = load_eval("test_tiny", 2 * n, seed=0)
        x = torch.nn.functional.interpolate(data.images, size=(size, size), mode="bilinear",
                                            align_corners=False).clamp(0, 1)
        return x, "test_tiny (synthetic), resized"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=32, help="side of synthetic images")
    ap.add_argument("--filters", type=int, default=64)
    ap.add_argument("--filter-size", type=int, default=8)
    ap.add_argument("--lmbda", type=float, default=0.2, help="sparsity weight (SRD: 0.2)")
    ap.add_argument("--iterations", type=int, default=200, help="iterations of each solver")
    ap.add_argument("--sporco-tol", type=float, default=1e-4, help="SPORCO's RelStopTol")
    ap.add_argument("--torch-tol", type=float, default=1e-4, help="FISTA's relative-change stop")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for BOTH solvers (torch intra-op, pyFFTW, BLAS)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random-dictionary", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="best-of-k timing")
    ap.add_argument("--json", action="store_true", help="print one JSON line at the end")
    args = ap.parse_args(argv)
    if args.threads:  # the same thread count for both solvers
        torch.set_num_threads(args.threads)
        import sporco.fft

        sporco.fft.pyfftw_threads = args.threads
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=args.threads)

    images, source = load_images(args.images, args.size)
    _, high = tikhonov_split(images.double(), 5.0, 16)
    code_set, dict_set = high[:args.images], high[args.images:]
    if args.random_dictionary:
        g = torch.Generator().manual_seed(0)
        D = normalise_filters(torch.randn(args.filters, 3, args.filter_size, args.filter_size,
                                          generator=g, dtype=torch.float64), ball=False)
    else:
        D = learn_conv_dictionary(dict_set.float(), num_filters=args.filters,
                                  filter_size=args.filter_size, lmbda=args.lmbda, iterations=10,
                                  batch_size=16, coding_iterations=15, seed=0).double()

    def timed(fn):
        best, out = float("inf"), None
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return out, best

    X_sp, t_sp = timed(lambda: sporco_conv_bpdn(D, code_set, args.lmbda,
                                                max_iter=args.iterations, tol=args.sporco_tol))
    dev = torch.device(args.device)
    results = {}
    for name, dtype in (("torch_float32", torch.float32), ("torch_float64", torch.float64)):
        Dd, Sd = D.to(dev, dtype), code_set.to(dev, dtype)
        conv_bpdn(Dd, Sd[:2], args.lmbda, max_iter=2)  # warm-up (FFT plans, allocations)
        (X_t, info), t_t = timed(lambda: conv_bpdn(Dd, Sd, args.lmbda, max_iter=args.iterations,
                                                   tol=args.torch_tol, return_info=True))
        results[name] = {"seconds": t_t, "iterations": info.iterations,
                         "objective": cbpdn_objective(D, X_t.cpu(), code_set, args.lmbda),
                         "nonzero_fraction": float((X_t != 0).float().mean())}
    f_sp = cbpdn_objective(D, X_sp, code_set, args.lmbda)
    f_zero = cbpdn_objective(D, torch.zeros_like(X_sp), code_set, args.lmbda)
    report = {
        "images": f"{args.images} x {tuple(code_set.shape[1:])} from {source}",
        "dictionary": f"{args.filters} filters {args.filter_size}x{args.filter_size}x3 "
                      f"({'random' if args.random_dictionary else 'learned'}), lambda {args.lmbda}",
        "iterations_cap": args.iterations,
        "torch_threads": torch.get_num_threads(), "device": args.device,
        "machine": platform.processor() or platform.machine(),
        "sporco": {"seconds": t_sp, "objective": f_sp},
        **results, "objective_at_zero": f_zero,
    }
    for name in results:
        r = results[name]
        r["speed_ratio_sporco_over_torch"] = t_sp / r["seconds"]
        r["objective_rel_diff_vs_sporco"] = (r["objective"] - f_sp) / f_sp
    print(f"images      : {report['images']}")
    print(f"dictionary  : {report['dictionary']}")
    print(f"threads     : torch {report['torch_threads']}, SPORCO/pyFFTW "
          f"{args.threads or 'its default (all cores)'}, device {args.device}")
    print(f"SPORCO ADMM : {t_sp:8.3f} s   objective {f_sp:.6f}   (objective at x=0: {f_zero:.4f})")
    for name, r in results.items():
        print(f"{name:12s}: {r['seconds']:8.3f} s   objective {r['objective']:.6f}   "
              f"rel diff {r['objective_rel_diff_vs_sporco']:+.2e}   {r['iterations']} its   "
              f"speed ratio {r['speed_ratio_sporco_over_torch']:.1f}x")
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
