"""The harness's reports: ``robustmatrix fit DEFENSE --report`` measures a fitted defense.

* :func:`fit_report`: the report of a defense that has one (:func:`has_report`): the semantic
  and plain autoencoders (:func:`semantic_ae_report`), the AAE detector (:func:`detector_report`)
  and the SRD purifier (:func:`purification_report` plus its clusters);
* :func:`tsne_figure`: t-SNE panels of several latent spaces side by side (PNG and SVG);
* :func:`semantic_ae_report`: the paper's claim as numbers: semantic latents separate the
  classes, the plain ones less so, while the decoded images barely differ.

The measures themselves (PSNR, SSIM, class separation) are :mod:`bench.core.metrics`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from bench.core.metrics import _numpy, batched_apply, psnr, separation_scores, ssim


# ----------------------------------------------------------------------------------------------
# t-SNE figure
# ----------------------------------------------------------------------------------------------
def tsne_figure(latent_sets: Mapping[str, tuple[Any, Any]], path: str | Path, *,
                class_names: Sequence[str] | None = None, max_points: int = 2000,
                perplexity: float = 30.0, seed: int = 0, title: str | None = None) -> list[Path]:
    """t-SNE of each named latent set ``name -> (z, labels)`` in side-by-side panels.

    Writes ``path`` with suffixes ``.png`` and ``.svg`` (matplotlib's Agg backend) and returns
    both paths. Each set is subsampled to ``max_points`` (seeded) and embedded separately.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    if not latent_sets:
        raise ValueError("tsne_figure needs at least one latent set")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    k = len(latent_sets)
    fig, axes = plt.subplots(1, k, figsize=(5 * k, 5), squeeze=False)
    cmap = plt.get_cmap("tab10" if max(_n_classes(v[1]) for v in latent_sets.values()) <= 10
                        else "tab20")
    handles = None
    for ax, (name, (z, labels)) in zip(axes[0], latent_sets.items()):
        z = _numpy(z).reshape(len(z), -1).astype(np.float32)
        y = _numpy(labels).astype(np.int64)
        if len(z) > max_points:
            keep = rng.choice(len(z), max_points, replace=False)
            z, y = z[keep], y[keep]
        perp = float(min(perplexity, max(2.0, (len(z) - 1) / 3.0)))
        tsne = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed)
        # OpenMP threads spin-wait: on a small set they cost several times the work on a
        # shared machine, so small sets run on one thread
        with threadpool_limits(limits=1 if len(z) <= 1000 else None):
            emb = tsne.fit_transform(z)
        handles = []
        for cls in np.unique(y):
            m = y == cls
            named = class_names is not None and cls < len(class_names)
            label = class_names[cls] if named else str(cls)
            handles.append(ax.scatter(emb[m, 0], emb[m, 1], s=6, color=cmap(int(cls) % cmap.N),
                                      label=label))
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    if handles:
        fig.legend(handles=handles, loc="center right", markerscale=3, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    out = [path.with_suffix(".png"), path.with_suffix(".svg")]
    fig.savefig(out[0], dpi=120)
    fig.savefig(out[1])
    plt.close(fig)
    return out


def _n_classes(labels: Any) -> int:
    return int(_numpy(labels).max()) + 1 if len(labels) else 0


# ----------------------------------------------------------------------------------------------
# the semantic-AE report
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def _encode_all(ae: Any, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    zs, xs = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        y = labels[i:i + batch_size].to(device) if labels is not None else None
        z = ae.encode(x, y)
        zs.append(z.cpu())
        xs.append(ae.decode(z).cpu())
    return torch.cat(zs), torch.cat(xs)


def _autoencoder_of(obj: Any) -> Any:
    """The SemanticAutoencoder inside a defense, a preprocessor, or the module itself."""
    if hasattr(obj, "require_fitted"):
        obj.require_fitted()
    ae = getattr(obj, "ae", obj)
    if not hasattr(ae, "encode") or not hasattr(ae, "decode"):
        raise TypeError(f"{type(obj).__name__} has no autoencoder (encode/decode)")
    return ae


def semantic_ae_report(defense: Any, data: Any, *, plain: Any = None, batch_size: int = 256,
                       seed: int = 0, figure_path: str | Path | None = None,
                       max_points: int = 2000) -> dict[str, Any]:
    """Separation and fidelity of the semantic AE (and of its plain twin, when given).

    ``defense``: a fitted ``semantic_ae`` defense (or any object with ``ae``/``encode``/
    ``decode``); ``plain``: the fitted ``plain_ae`` twin, or None; ``data``: a LabeledImages.
    Returns, per autoencoder, ``silhouette``, ``linear_probe_accuracy`` (of the latents, with
    the TRUE labels given to the semantic encoder), ``psnr`` and ``ssim`` of the reconstructions
    (means, dB / unitless); for the semantic AE also the same with the classifier's PREDICTED
    labels (what the defense sees at test time), and, when ``plain`` is given, the PSNR/SSIM
    between the two AEs' decoded images ("decoded images barely differ"). With
    ``figure_path`` the t-SNE panels are written there too.
    """
    images, labels = data.images.float(), data.labels.long()
    ae = _autoencoder_of(defense)
    device = next(ae.parameters()).device
    report: dict[str, Any] = {"n": int(len(images))}
    latent_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def entry(z: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
        out = separation_scores(z, labels, seed=seed)
        out["psnr"] = float(psnr(x_hat, images).clamp(max=100.0).mean())
        out["ssim"] = float(ssim(x_hat, images).mean())
        return out

    name = "semantic" if getattr(ae, "label_conditioned", True) else "plain"
    z_sem, x_sem = _encode_all(ae, images, labels if ae.label_conditioned else None,
                               batch_size, device)
    report[name] = entry(z_sem, x_sem)
    latent_sets[f"{name} AE latents"] = (z_sem, labels)
    predict = getattr(defense, "predict_labels", None)
    if ae.label_conditioned and predict is not None:
        y_hat = torch.cat([predict(images[i:i + batch_size].to(device)).cpu()
                           for i in range(0, len(images), batch_size)])
        z_pred, x_pred = _encode_all(ae, images, y_hat, batch_size, device)
        report["semantic_predicted_label"] = entry(z_pred, x_pred)
        report["semantic_predicted_label"]["classifier_accuracy"] = float(
            (y_hat == labels).float().mean())
    if plain is not None:
        plain_ae = _autoencoder_of(plain)
        z_plain, x_plain = _encode_all(plain_ae, images, None, batch_size,
                                       next(plain_ae.parameters()).device)
        report["plain"] = entry(z_plain, x_plain)
        latent_sets["plain AE latents"] = (z_plain, labels)
        report["decoded_semantic_vs_plain"] = {
            "psnr": float(psnr(x_sem, x_plain).clamp(max=100.0).mean()),
            "ssim": float(ssim(x_sem, x_plain).mean())}
    if figure_path is not None:
        paths = tsne_figure(latent_sets, figure_path, class_names=getattr(data, "classes", None),
                            max_points=max_points, seed=seed)
        report["figures"] = [str(p) for p in paths]
    return report


def wrong_label_attack_report(defense: Any, data: Any, out: Any, *, twin: Any = None,
                              eps: float = 8 / 255, batch_size: int = 256) -> dict[str, Any]:
    """The wrong-label latent attack (Linf ``eps``, runner-up wrong label) on the fitted
    semantic AE ``defense``, measured on ``data``: :func:`attacks.wrong_label_latent.
    wrong_label_report` (PSNR/SSIM of x', fraction of z' nearest the wrong centroid, the
    latent probe on z', the k-means assignment change, t-SNE ``out/tsne_wrong_label``), the
    picture grid ``out/wrong_label_grid`` and the accuracy on x' of the defense, of its bare
    classifier and of the plain ``twin``."""
    from attacks.wrong_label_latent import WrongLabelLatent, picture_grid, wrong_label_report

    attack = WrongLabelLatent(threat="linf", autoencoder=defense)
    device = next(defense.parameters()).device
    images, labels = data.images.float(), data.labels.long()
    advs, z, zw, yw, dist = [], [], [], [], {}
    with torch.no_grad():
        for i in range(0, len(labels), batch_size):
            r = attack(defense, images[i:i + batch_size].to(device),
                       labels[i:i + batch_size].to(device), eps, seed=0)
            advs.append(r.adv.cpu())
            z += r.extras["latent"]["z_clean"]
            zw += r.extras["latent"]["z_wrong"]
            yw += r.extras["latent"]["wrong_labels"]
            for k, v in r.extras["image_distances"].items():
                dist.setdefault(k, []).extend(v)
    adv = torch.cat(advs)
    rep = wrong_label_report(z, zw, labels.tolist(), yw, distances=dist,
                             figure_path=Path(out) / "tsne_wrong_label",
                             class_names=getattr(data, "classes", None))
    rep.setdefault("figures", []).extend(
        str(p) for p in picture_grid(images, adv, Path(out) / "wrong_label_grid"))
    acc = {"semantic_ae": defense, "bare_classifier": defense.classifier}
    if twin is not None:
        acc["plain_ae"] = twin
    rep["accuracy_on_x_adv"] = {
        name: float((batched_apply(m, adv, device, batch_size).argmax(1) == labels)
                    .float().mean()) for name, m in acc.items()}
    rep["eps"] = eps
    return rep


# ----------------------------------------------------------------------------------------------
# reports of the other defenses (``robustmatrix fit DEFENSE --report``)
# ----------------------------------------------------------------------------------------------
def purification_report(defense: Any, data: Any, *, batch_size: int = 256) -> dict[str, Any]:
    """What a preprocessor/purifier does to CLEAN images: PSNR and SSIM of its output against
    its input (means), and the accuracy of the classifier on the raw vs the purified images
    (the defense's clean accuracy is the latter)."""
    pre = getattr(defense, "preprocessor", None)
    if pre is None:
        raise TypeError(f"{type(defense).__name__} has no preprocessor")
    images, labels = data.images.float(), data.labels.long()
    device = next(defense.parameters()).device
    purified = batched_apply(pre, images, device, batch_size)
    raw_pred = batched_apply(defense.classifier, images, device, batch_size).argmax(1)
    pur_pred = batched_apply(defense.classifier, purified, device, batch_size).argmax(1)
    return {"n": int(len(images)),
            "purified_vs_input": {"psnr": float(psnr(purified, images).clamp(max=100.0).mean()),
                                  "ssim": float(ssim(purified, images).mean()),
                                  "linf": float((purified - images).abs().amax()),
                                  "in_unit_box": bool(purified.min() >= 0 and purified.max() <= 1)},
            "classifier_accuracy_raw": float((raw_pred == labels).float().mean()),
            "classifier_accuracy_purified": float((pur_pred == labels).float().mean())}


def pgd_transfer_images(model: Any, data: Any, *, eps: float = 8 / 255, steps: int = 10,
                        seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """Adversarials of the registered ``pgd`` attack (Linf, seeded) against ``model`` (e.g. a
    defense's bare classifier): the non-adaptive images a detector report measures detection
    on."""
    from bench.core.registry import create_attack

    device = next(model.parameters()).device
    attack = create_attack("pgd", threat="linf", steps=steps, seed=seed)
    return torch.cat([attack(model, data.images[i:i + batch_size].float().to(device),
                             data.labels[i:i + batch_size].long().to(device), eps,
                             seed=seed).adv.cpu()
                      for i in range(0, len(data.labels), batch_size)])


def detector_report(defense: Any, data: Any, *, figure_path: str | Path | None = None,
                    eps: float = 8 / 255, seed: int = 0, max_points: int = 2000
                    ) -> dict[str, Any]:
    """An AAE-style detector measured on held-out clean images and two kinds of perturbed ones:
    Gaussian noise (std ``eps``) and PGD-10 Linf ``eps`` against the bare classifier (the
    non-adaptive attack). FPR, detection rate and AUROC for each (``detection_metrics``); the
    distance of the clean codes to the prior; with ``figure_path`` the t-SNE of the codes of
    clean vs PGD images."""
    from defenses.aae_detector import detection_metrics, prior_distance

    images, labels = data.images.float(), data.labels.long()
    g = torch.Generator().manual_seed(seed)
    noisy = (images + eps * torch.randn(images.shape, generator=g)).clamp(0, 1)
    adv = pgd_transfer_images(defense.classifier, data, eps=eps, seed=seed)
    report: dict[str, Any] = {
        "n": int(len(images)), "eps": eps,
        "gaussian_noise": detection_metrics(defense, images, noisy),
        "pgd_on_classifier": detection_metrics(defense, images, adv)}
    aae = getattr(defense, "aae", None)
    if aae is not None:
        device = next(aae.parameters()).device
        z_clean = batched_apply(aae.encode, images, device)
        z_adv = batched_apply(aae.encode, adv, device)
        report["prior_distance_clean_codes"] = prior_distance(z_clean, aae.prior, seed=seed)
        if figure_path is not None:
            paths = tsne_figure({"AAE codes, clean": (z_clean, labels),
                                 "AAE codes, PGD on the classifier": (z_adv, labels)},
                                figure_path, class_names=getattr(data, "classes", None),
                                max_points=max_points, seed=seed)
            report["figures"] = [str(p) for p in paths]
    return report


# ----------------------------------------------------------------------------------------------
# ``robustmatrix fit DEFENSE --report``
# ----------------------------------------------------------------------------------------------
def _report_kind(defense: Any) -> str | None:
    from defenses.aae_detector import AAEDetectorDefense
    from defenses.semantic_autoencoder import SemanticAutoencoderDefense
    from defenses.srd_purifier import SRDDefense

    for cls, kind in ((SemanticAutoencoderDefense, "autoencoder"), (AAEDetectorDefense, "detector"),
                      (SRDDefense, "purifier")):
        if isinstance(defense, cls):
            return kind
    return None


def selection_accuracy(defense: Any, data: Any, *, eps: float = 8 / 255,
                       chosen: torch.Tensor | None = None) -> dict[str, Any]:
    """The SRD purifier's dictionary choice measured: the fraction of ``data``'s clean images,
    and of their PGD-10 (Linf ``eps``) adversarials against the purifier's classifier, whose
    chosen dictionary (nearest cluster in the classifier's latent space) belongs to their TRUE
    class. ``chosen``: the clean images' clusters when the caller has them already."""
    p = defense.purifier
    device = next(defense.parameters()).device
    labels = data.labels.long()
    owner = p.cluster_class.cpu()
    if chosen is None:
        chosen = batched_apply(p.nearest_cluster, data.images.float(), device)
    clean = owner[chosen.cpu()]
    adv = pgd_transfer_images(defense.classifier, data, eps=eps)
    adv_owner = owner[batched_apply(p.nearest_cluster, adv, device).cpu()]
    return {"clean": float((clean == labels).float().mean()),
            "pgd_on_classifier": float((adv_owner == labels).float().mean()),
            "eps": eps, "n": int(len(labels))}


def _default_linf_eps(data: Any) -> float:
    """The Linf budget the reports attack at: the dataset's default (8/255 on CIFAR-10, 4/255
    on ImageNet-10 at 64 px), 8/255 when the dataset is unknown."""
    from bench.data import dataset_info

    try:
        info = dataset_info(data.dataset, resolution=getattr(data, "resolution", None))
        return float(info.default_eps["linf"])
    except (LookupError, ValueError, AttributeError):  # a dataset without defaults
        return 8 / 255


def has_report(defense: Any) -> bool:
    """The defense has a ``fit --report`` (semantic_ae, plain_ae, aae_detector, srd)."""
    return _report_kind(defense) is not None


def report_twin(defense: Any) -> str | None:
    """The registered plain twin a semantic autoencoder's report compares against (fitted or
    reused with the same options), or None."""
    if _report_kind(defense) != "autoencoder" or not defense.label_conditioned:
        return None
    name = getattr(defense, "registry_name", "semantic_ae")
    return name.replace("semantic_ae", "plain_ae")


def fit_report(defense: Any, data: Any, out: Any, *, twin: Any = None) -> dict[str, Any]:
    """The report of a fitted defense on held-out ``data``; figures go to the folder ``out``.

    * autoencoders: separation (silhouette, linear probe) and PSNR/SSIM for the AE and its
      plain ``twin``, the decoded-image distance between the two, and the t-SNE figure of both
      latent spaces (``out/tsne_latents.png|svg``);
    * the AAE detector: FPR / detection rate / AUROC vs Gaussian noise and vs non-adaptive PGD
      on the bare classifier, the clean codes' distance to the prior, and the t-SNE figure of
      the codes (``out/tsne_codes.png|svg``), see :func:`detector_report`;
    * the SRD purifier: PSNR/SSIM of the purified images against their input, the robust
      model's accuracy on raw vs purified images, how the clusters are used (share of images
      per chosen cluster), and the fit's clustering figures when this process fitted it.
    """
    kind = _report_kind(defense)
    eps = _default_linf_eps(data)
    if kind == "autoencoder":
        rep = semantic_ae_report(defense, data, plain=twin,
                                 figure_path=Path(out) / "tsne_latents")
        rep["purification"] = purification_report(defense, data)
        if twin is not None:
            rep["plain_purification"] = purification_report(twin, data)
        if defense.label_conditioned:
            rep["wrong_label_attack"] = wrong_label_attack_report(defense, data, out, twin=twin,
                                                                  eps=eps)
        return rep
    if kind == "detector":
        return detector_report(defense, data, figure_path=Path(out) / "tsne_codes", eps=eps)
    if kind == "purifier":
        rep = purification_report(defense, data)
        p = defense.purifier
        chosen = batched_apply(p.nearest_cluster, data.images, next(defense.parameters()).device)
        counts = torch.bincount(chosen, minlength=p.num_clusters)
        rep["clusters"] = {"count": int(p.num_clusters),
                           "per_class": torch.bincount(p.cluster_class.cpu(),
                                                       minlength=defense.num_classes).tolist(),
                           "share_chosen": (counts.float() / max(len(chosen), 1)).tolist()}
        rep["selection_accuracy"] = selection_accuracy(defense, data, eps=eps, chosen=chosen)
        if getattr(defense, "fit_info", None):
            rep["fit"] = {k: v for k, v in defense.fit_info.items() if k != "settings"}
        return rep
    raise TypeError(f"{type(defense).__name__} has no report")
