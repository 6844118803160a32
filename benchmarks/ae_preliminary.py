"""A SHORT measurement of the autoencoder defenses on real CIFAR-10 (not the standard scale).

    OMP_NUM_THREADS=1 python benchmarks/ae_preliminary.py sae  [--train 5000 --epochs 4 --test 500]
    OMP_NUM_THREADS=1 python benchmarks/ae_preliminary.py aae  [--train 5000 --epochs 4 --test 500]

``sae``: the semantic AE and its plain twin fitted on a class-balanced train subset, the
classifier (akamaster ResNet-20) fine-tuned on reconstructions for ``--finetune`` epochs;
reported on ``--test`` held-out test images: PSNR/SSIM, silhouette and linear probe of both
latent spaces, the classifier's clean accuracy raw and behind the purifier, then the
wrong-label latent attack (Linf 8/255) on the semantic AE: PSNR/SSIM of x', fraction of z'
nearest the wrong centroid, the latent probe on z', the k-means assignment change.
``aae``: the AAE detector fitted the same way; per-score and combined AUROC and the detection
rate at the calibrated 5% FPR against Gaussian noise and non-adaptive PGD-10 Linf 8/255 on the
bare classifier. Prints one JSON object and writes it (and the figures) under ``--out``.
It shows the DIRECTION of each effect at a few CPU minutes; the standard presets are what
docs/results.md's headline figures must come from.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _common  # noqa: F401 - puts the repository on sys.path when not installed
import torch


def sae(args) -> dict:
    from attacks.wrong_label_latent import WrongLabelLatent, picture_grid, wrong_label_report
    from bench.core.registry import DEFENSES
    from bench.data import load_eval, load_train
    from bench.harness.reports import purification_report, semantic_ae_report
    from bench.models.training import evaluate_accuracy

    train = load_train("cifar10", limit=args.train)
    test = load_eval("cifar10", args.test)
    out = Path(args.out)
    res: dict = {"train_images": len(train.labels), "test_images": len(test.labels)}
    t0 = time.perf_counter()
    sem = DEFENSES.create("semantic_ae", epochs=args.epochs,
                          classifier_finetune_epochs=args.finetune,
                          class_weight=args.class_weight)
    raw_acc = evaluate_accuracy(sem.classifier, test)
    sem.fit(train, progress=False).eval()
    res["semantic_fit_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = DEFENSES.create("plain_ae", epochs=args.epochs, classifier_finetune_epochs=0)
    plain.fit(train, progress=False).eval()
    res["plain_fit_seconds"] = time.perf_counter() - t0
    res["report"] = semantic_ae_report(sem, test, plain=plain, figure_path=out / "tsne_latents",
                                       max_points=args.test)
    res["classifier_accuracy_raw_before_finetune"] = raw_acc
    res["purification"] = purification_report(sem, test)
    res["plain_purification_same_classifier"] = purification_report(plain, test)
    eps = 8 / 255
    attack = WrongLabelLatent(threat="linf", autoencoder=sem)
    with torch.no_grad():
        r = attack(sem, test.images, test.labels, eps, seed=0)
    lat = r.extras["latent"]
    res["wrong_label"] = wrong_label_report(
        lat["z_clean"], lat["z_wrong"], lat["labels"], lat["wrong_labels"],
        distances=r.extras["image_distances"], figure_path=out / "tsne_wrong_label")
    picture_grid(test.images, r.adv, out / "wrong_label_grid")
    with torch.no_grad():
        res["wrong_label"]["defense_accuracy_on_x_adv"] = {
            "semantic_ae": float((sem(r.adv).argmax(1) == test.labels).float().mean()),
            "plain_ae": float((plain(r.adv).argmax(1) == test.labels).float().mean())}
    return res


def aae(args) -> dict:
    from bench.core.registry import DEFENSES
    from bench.data import load_eval, load_train
    from bench.harness.reports import detector_report

    train = load_train("cifar10", limit=args.train)
    test = load_eval("cifar10", args.test)
    t0 = time.perf_counter()
    d = DEFENSES.create("aae_detector", epochs=args.epochs)
    d.fit(train, progress=False).eval()
    res = {"train_images": len(train.labels), "test_images": len(test.labels),
           "fit_seconds": time.perf_counter() - t0, "calibration": d.calibration}
    res["report"] = detector_report(d, test, figure_path=Path(args.out) / "tsne_codes",
                                    max_points=args.test)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("sae", "aae"))
    ap.add_argument("--train", type=int, default=5000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--finetune", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--class-weight", type=float, default=1.0, help="semantic AE class term")
    ap.add_argument("--out", default="benchmarks/results/ae_preliminary")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    res = (sae if args.what == "sae" else aae)(args)
    res["wall_seconds"] = time.perf_counter() - t0
    res["args"] = vars(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.what}.json").write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
