"""SRD's FISTA kernel: the chunked elementwise D^H D y against the per-frequency batched matmul.

Side by side in one process, interleaved: the fitted SRD purifier's forward (its real
per-cluster solves, a few images per dictionary) and its BPDA surrogate's forward + backward,
once with ``defenses.sparse_coding._normal_operator`` (the solver's kernel) and once with it
swapped for ``_normal_operator_bmm`` (the previous kernel, kept as the reference). Reports the
time ratio bmm / elementwise per round and the largest output difference.

    python benchmarks/srd_normal_operator.py --preset standard --images 250 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse

import torch
from _common import interleaved, ratio_stats, write_result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="standard", help="the SRD artifact's fit preset")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--images", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import defenses.sparse_coding as sc
    from bench.artifacts import prepare_defense
    from bench.data import load_eval

    srd, info = prepare_defense("srd", {}, dataset=args.dataset, preset=args.preset, log=print)
    srd.eval()
    p = srd.purifier
    x = load_eval(args.dataset, args.images, seed=0).images
    kernels = {"elementwise": sc._normal_operator, "bmm": sc._normal_operator_bmm}
    fast = kernels["elementwise"]

    def with_kernel(name, fn):
        def run():
            sc._normal_operator = kernels[name]
            try:
                return fn()
            finally:
                sc._normal_operator = fast
        return run

    def purify():
        with torch.no_grad():
            return p(x)

    xs = x[: max(1, len(x) // 4)]
    sur = p.surrogate()

    def surrogate_step():
        xx = xs.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(sur(xx).sum(), xx)
        return g

    fns = {f"{task} {k}": with_kernel(k, fn) for task, fn in
           (("purify", purify), ("surrogate", surrogate_step)) for k in kernels}
    times = interleaved(fns, args.rounds, warmup=0)
    diff = float((with_kernel("bmm", purify)() - purify()).abs().max())
    result = {"artifact": info.get("artifact"), "images": len(x), "threads": args.threads,
              "clusters_used": int(p.nearest_cluster(x).unique().numel()),
              "purify_bmm_over_elementwise": ratio_stats(times["purify bmm"],
                                                         times["purify elementwise"]),
              "surrogate_bmm_over_elementwise": ratio_stats(times["surrogate bmm"],
                                                            times["surrogate elementwise"]),
              "seconds": times, "max_abs_output_difference": diff}
    for k in ("purify_bmm_over_elementwise", "surrogate_bmm_over_elementwise"):
        s = result[k]
        print(f"{k}: {s['median']:.2f}x (range {s['min']:.2f}-{s['max']:.2f})")
    print(f"max |output difference| {diff:.2e}; {result['clusters_used']} clusters used by "
          f"{len(x)} images, {args.threads} thread(s)")
    write_result(f"srd_normal_operator_{args.dataset}_{args.preset}", result)
    return result


if __name__ == "__main__":
    main()
