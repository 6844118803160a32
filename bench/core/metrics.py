"""Measures shared by the harness's reports, the defenses and the wrong-label latent attack.

* :func:`separation_scores`: how well latents separate the classes (silhouette score and the
  held-out accuracy of a linear probe).
* :func:`psnr`, :func:`ssim`: image fidelity (SSIM with an 11x11 Gaussian window, sigma 1.5,
  K1 = 0.01, K2 = 0.03 and no padding, as in Wang et al. 2004 and ``pytorch_msssim``).
* :func:`batched_apply`: a function over images in batches, without gradients.
"""

from __future__ import annotations

from typing import Any

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


@torch.no_grad()
def batched_apply(fn: Any, images: torch.Tensor, device: torch.device,
                  batch_size: int = 256) -> torch.Tensor:
    """``fn`` over ``images`` in batches on ``device`` without gradients; results on the CPU."""
    return torch.cat([fn(images[i:i + batch_size].float().to(device)).cpu()
                      for i in range(0, len(images), batch_size)])
