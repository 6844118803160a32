"""SRD purification throughput (images per second) against SPORCO, and the cost of a BPDA cell.

Three things, side by side in one process, interleaved (A B C, B C A, ...) so load from other
processes hits them alike:

* ``srd``: the fitted SRD purifier's ``forward`` on N test images (robust latent -> nearest
  cluster, Tikhonov split, batched torch FISTA for ``coding_iterations`` with the defense's
  tolerance, rebuild), i.e. what one clean pass of the defense costs before the classifier;
* ``sporco``: SPORCO's ADMM ``ConvBPDN`` on the SAME high bands with the SAME chosen dictionary
  per image and the same iteration cap (the dictionary choice and the split are computed once,
  outside the timing: only the sparse coding differs, and it is where the time goes);
* ``bpda_cell``: one BPDA+PGD-10 attack on the same images through the harness's attack
  (``adaptive`` with ``bpda: true``: forward through the real purifier, backward through the
  unrolled surrogate), plus ``bpda_identity_cell`` (identity backward).

Reports images/s of each, SPORCO time / SRD time, and the BPDA cell in units of clean
defense passes (the load-independent figure), plus both solvers' CBPDN objectives.

    python benchmarks/srd_throughput.py --preset quick --images 64 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse

import torch
from _common import interleaved, ratio_stats, write_result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quick", help="the SRD artifact's fit preset")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-attack", action="store_true", help="skip the BPDA cells")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import sporco.fft
        from threadpoolctl import threadpool_limits

        sporco.fft.pyfftw_threads = args.threads
        threadpool_limits(limits=args.threads)
    except ImportError:
        pass

    from attacks.base import RunContext
    from bench.artifacts import prepare_defense
    from bench.core.registry import ATTACKS
    from bench.data import dataset_info, load_eval
    from defenses.sparse_coding import cbpdn_objective, conv_bpdn, sporco_conv_bpdn

    ds_opts = {"resolution": args.resolution} if args.resolution else {}
    srd, info = prepare_defense("srd", {}, dataset=args.dataset, dataset_options=ds_opts,
                                preset=args.preset, log=print)
    srd.eval()
    p = srd.purifier
    data = load_eval(args.dataset, args.images, seed=0, **ds_opts)
    x, y = data.images, data.labels
    eps = float(dataset_info(args.dataset).default_eps["linf"])
    with torch.no_grad():
        _, high = p.split(x)
        cluster = p.nearest_cluster(x)
    groups = [(c, (cluster == c).nonzero().flatten()) for c in cluster.unique().tolist()]
    iters, lmbda = p.coding_iterations, p.sparsity

    def run_srd():
        with torch.no_grad():
            return p(x)

    def run_sporco():
        out = {}
        for c, sel in groups:
            out[c] = sporco_conv_bpdn(p.dictionaries[c].double(), high[sel].double(), lmbda,
                                      max_iter=iters, tol=p.coding_tol)
        return out

    fns = {"srd": run_srd, "sporco": run_sporco}
    ctx = RunContext(dataset=args.dataset, dataset_options=ds_opts)
    if not args.no_attack:
        bpda = ATTACKS.create("adaptive", threat="linf", inner="pgd",
                              inner_options={"steps": 10}, bpda=True, eot=0, detector="ignore")
        ident = ATTACKS.create("adaptive", threat="linf", inner="pgd",
                               inner_options={"steps": 10}, bpda=True, surrogate="identity",
                               eot=0, detector="ignore")
        fns["bpda_cell"] = lambda: bpda(srd, x, y, eps, seed=0, context=ctx)
        fns["bpda_identity_cell"] = lambda: ident(srd, x, y, eps, seed=0, context=ctx)
    times = interleaved(fns, args.rounds, warmup=0)

    # both solvers' objectives on the same problems (the SRD path's own FISTA call)
    obj_t = obj_s = 0.0
    sp = run_sporco()
    for c, sel in groups:
        D = p.dictionaries[c]
        X = conv_bpdn(D, high[sel], lmbda, max_iter=iters, tol=p.coding_tol)
        obj_t += cbpdn_objective(D, X, high[sel], lmbda)
        obj_s += cbpdn_objective(D, sp[c], high[sel], lmbda)
    n = len(y)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    result = {
        "artifact": info.get("artifact"), "preset": args.preset, "images": n,
        "dictionary": list(p.dictionaries.shape), "clusters_used": len(groups),
        "coding_iterations": iters, "threads": args.threads,
        "images_per_second": {k: n / v for k, v in med.items()},
        "sporco_over_srd": ratio_stats(times["sporco"], times["srd"]),
        "objective": {"srd_fista": obj_t, "sporco_admm": obj_s,
                      "rel_diff": (obj_t - obj_s) / obj_s},
    }
    if not args.no_attack:
        result["bpda_cell_in_clean_passes"] = ratio_stats(times["bpda_cell"], times["srd"])
        result["bpda_identity_cell_in_clean_passes"] = ratio_stats(times["bpda_identity_cell"],
                                                                   times["srd"])
    print(f"SRD ({args.preset}) dictionaries {tuple(p.dictionaries.shape)}, {iters} FISTA "
          f"iterations, {n} images, {args.threads} threads, {len(groups)} clusters used")
    for k, v in result["images_per_second"].items():
        print(f"  {k:20s} {v:8.2f} images/s")
    s = result["sporco_over_srd"]
    print(f"  SPORCO time / SRD time: {s['median']:.2f} (range {s['min']:.2f}-{s['max']:.2f})")
    o = result["objective"]
    print(f"  objective: SRD FISTA {o['srd_fista']:.4f}, SPORCO {o['sporco_admm']:.4f} "
          f"(rel diff {o['rel_diff']:+.2e})")
    if not args.no_attack:
        for k in ("bpda_cell_in_clean_passes", "bpda_identity_cell_in_clean_passes"):
            s = result[k]
            print(f"  {k}: {s['median']:.1f} (range {s['min']:.1f}-{s['max']:.1f})")
    write_result(f"srd_throughput_{args.dataset}_{args.preset}", result)
    return result


if __name__ == "__main__":
    main()
