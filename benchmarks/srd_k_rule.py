"""SRD's k rule on the real features: the k per class that the lowest BIC and the per-image
BIC gain (``bic_gain``) choose, as the number of images per class grows.

The features are the penultimate latents of the shipped PGD-AT standard model (the space the
standard SRD clusters in) on the CIFAR-10 train split. Not a timing: a measurement of the
rule (issue 14), recorded in ``docs/results.md``.

    python benchmarks/srd_k_rule.py --sizes 500 1000 0 --max-clusters 4
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import write_result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 0],
                    help="images per class (0: all)")
    ap.add_argument("--max-clusters", type=int, default=4)
    ap.add_argument("--gain-min", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    args = ap.parse_args(argv)
    from bench.data import load_train
    from defenses.srd_purifier import SRDDefense, cluster_latents, shipped_pgd_at_classifier

    train = load_train("cifar10")
    model = shipped_pgd_at_classifier("cifar10", None, "resnet20", 10, "cpu", {})
    feats = SRDDefense._features(model, train.images, "cpu")
    labels = train.labels
    rng = np.random.default_rng(0)
    rows = []
    for size in args.sizes:
        if size:
            keep = np.concatenate([rng.choice(np.nonzero(labels.numpy() == c)[0], size,
                                              replace=False) for c in range(10)])
            f, y = feats[torch.from_numpy(keep)], labels[torch.from_numpy(keep)]
        else:
            f, y = feats, labels
        for rule, g in [("bic", None)] + [("bic_gain", g) for g in args.gain_min]:
            out = cluster_latents(f, y, 10, max_clusters=args.max_clusters, k_rule=rule,
                                  gain_min=g if g is not None else 0.5)
            rows.append({"images_per_class": size or "all", "rule": rule, "gain_min": g,
                         "k_per_class": out["k_per_class"], "clusters": sum(out["k_per_class"])})
            print(rows[-1], flush=True)
    write_result("srd_k_rule", {"rows": rows, "max_clusters": args.max_clusters})
    return {"rows": rows}


if __name__ == "__main__":
    main()
