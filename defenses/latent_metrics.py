"""Measurements shared by the autoencoder defenses and the wrong-label latent attack.

* :func:`separation_scores`: how well latents separate the classes (silhouette score and the
  held-out accuracy of a linear probe).
* :func:`psnr`, :func:`ssim`: image fidelity (SSIM with an 11x11 Gaussian window, sigma 1.5,
  K1 = 0.01, K2 = 0.03 and no padding, as in Wang et al. 2004 and ``pytorch_msssim``).
* :func:`tsne_figure`: t-SNE panels of several latent spaces side by side (PNG and SVG).
* :func:`semantic_ae_report`: the paper's claim as numbers: semantic latents separate the
  classes, the plain ones less so, while the decoded images barely differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# class separation of latents
# ----------------------------------------------------------------------------------------------
def _numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def separation_scores(latents: Any, labels: Any, *, test_fraction: float = 0.3, seed: int = 0,
                      silhouette_sample: int | None = 5000, max_iter: int = 2000
                      ) -> dict[str, float]:
    """Silhouette score (Euclidean, in [-1, 1]) and linear-probe accuracy of ``latents``.

    The probe is a standardised multinomial logistic regression trained on a stratified
    ``1 - test_fraction`` split and scored on the rest. Silhouette uses at most
    ``silhouette_sample`` points (seeded) to bound its quadratic cost.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    z = _numpy(latents).reshape(len(latents), -1).astype(np.float64)
    y = _numpy(labels).astype(np.int64)
    if len(z) != len(y):
        raise ValueError(f"{len(z)} latents but {len(y)} labels")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ValueError("separation needs at least two classes")
    sample = silhouette_sample if silhouette_sample and len(z) > silhouette_sample else None
    silhouette = float(silhouette_score(z, y, sample_size=sample, random_state=seed))
    stratify = y if counts.min() >= 2 else None
    z_train, z_test, y_train, y_test = train_test_split(
        z, y, test_size=test_fraction, random_state=seed, stratify=stratify)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    probe.fit(z_train, y_train)
    return {"silhouette": silhouette,
            "linear_probe_accuracy": float(probe.score(z_test, y_test)),
            "n": int(len(z)), "n_probe_test": int(len(z_test))}


# ----------------------------------------------------------------------------------------------
# image fidelity
# ----------------------------------------------------------------------------------------------
def psnr(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0,
         reduction: str = "none") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (identical images give +inf)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    out = 10.0 * torch.log10(data_range ** 2 / mse)
    return _reduce(out, reduction)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2.0
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0, window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
         reduction: str = "none") -> torch.Tensor:
    """Structural similarity per image (mean over channels and valid window positions).

    Images smaller than the window use the largest odd window that fits. Differentiable.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two (N, C, H, W) tensors of one shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    x, y = x.float(), y.float()
    n, c, h, w = x.shape
    size = min(window_size, h, w)
    size -= (size + 1) % 2  # odd
    g = _gaussian_window(size, sigma, x.device)
    wx = g.view(1, 1, 1, size).repeat(c, 1, 1, 1)
    wy = g.view(1, 1, size, 1).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, wx, groups=c), wy, groups=c)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x ** 2
    syy = blur(y * y) - mu_y ** 2
    sxy = blur(x * y) - mu_x * mu_y
    s = (((2 * mu_x * mu_y + c1) * (2 * sxy + c2))
         / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2)))
    return _reduce(s.flatten(1).mean(1), reduction)


def _reduce(t: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return t
    if reduction == "mean":
        return t.mean()
    raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")


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


# ----------------------------------------------------------------------------------------------
# reports of the other defenses (``robustmatrix fit DEFENSE --report``)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def batched_apply(fn: Any, images: torch.Tensor, device: torch.device,
                  batch_size: int = 256) -> torch.Tensor:
    """``fn`` over ``images`` in batches on ``device`` without gradients; results on the CPU."""
    return torch.cat([fn(images[i:i + batch_size].float().to(device)).cpu()
                      for i in range(0, len(images), batch_size)])


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
    from bench.registry import create_attack

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
