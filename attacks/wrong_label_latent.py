"""The wrong-label latent attack (Ming, Du, Lin, arXiv 2205.15592; METHODS.md section 1).

[known] A semantic autoencoder's latent depends on the image AND the label. Encoding an input
with a deliberately WRONG label moves the latent to the wrong class's region while the decoded
image stays almost the same, so any learner that consumes the latent is fooled.

Attack (as in METHODS.md): for each input pick ``y' != y`` (``target``: "runner-up", the
defense's highest-scoring class other than ``y``, the default; "random"; or a class index),
``x' = D(E(x, y'))``, projected to the threat model's ball around ``x`` (``threat`` "linf" or
"l2" with the cell's epsilon, or "none" for the unprojected reconstruction).

The autoencoder (``autoencoder``): "auto" uses the defense's own semantic autoencoder when its
preprocessor is one, otherwise a semantic autoencoder fitted for the dataset through
``bench.artifacts.prepare_defense`` (``semantic_ae``; ``test_semantic_ae`` on ``test_tiny``);
or a registry name of such a defense (``autoencoder_options`` are its options); or, from
Python, a fitted autoencoder module (or a defense holding one).

Report (:func:`wrong_label_report`, stored as the cell's ``metrics['report']`` by the runner):
image distances of ``x'`` to ``x`` (Linf, L2, PSNR, SSIM), latent shift (distances of ``z'`` to
the class centroids of the clean latents, how often ``z'`` is nearest the wrong class's
centroid, a linear probe's accuracy on ``z'``, how a k-means clustering fitted on the clean
latents changes its assignments), a t-SNE figure of clean vs wrong-label latents and a picture
grid of ``x``, ``x'``, ``|x' - x|`` (PNG and SVG) in ``<run dir>/figures/``. The accuracy of
every defense on ``x'`` is the matrix cell itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from attacks.adaptive import unwrap
from attacks.base import Attack, AttackResult, RunContext
from bench.core.registry import ATTACKS

#: the semantic autoencoder defense fitted for a dataset when the defense has none
DEFAULT_AUTOENCODER = {"test_tiny": "test_semantic_ae"}


def semantic_autoencoder_of(obj: Any) -> nn.Module | None:
    """The label-conditioned autoencoder (``encode(x, y)``/``decode(z)``) inside a defense, its
    preprocessor, or the object itself; None when there is none."""
    for cand in (getattr(getattr(obj, "preprocessor", None), "ae", None), getattr(obj, "ae", None),
                 obj):
        if cand is not None and hasattr(cand, "encode") and hasattr(cand, "decode") and \
                getattr(cand, "label_conditioned", False):
            return cand
    return None


def choose_wrong_labels(logits: torch.Tensor, labels: torch.Tensor, target: Any,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """``y' != y`` per sample: "runner-up" (highest logit other than y), "random", or a class
    index (samples of that class get the runner-up instead)."""
    k = logits.shape[1]
    masked = logits.float().masked_fill(
        torch.nn.functional.one_hot(labels, k).bool(), float("-inf"))
    runner_up = masked.argmax(1)
    if target == "runner-up":
        return runner_up
    if target == "random":
        off = torch.randint(1, k, labels.shape, generator=generator).to(labels.device)
        return (labels + off) % k
    t = int(target)
    if not 0 <= t < k:
        raise ValueError(f"target class {t} out of range for {k} classes")
    return torch.where(labels == t, runner_up, torch.full_like(labels, t))


def project(x_new: torch.Tensor, x: torch.Tensor, eps: float, threat: str) -> torch.Tensor:
    d = x_new - x
    if threat == "linf":
        d = d.clamp(-eps, eps)
    elif threat == "l2":
        n = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        d = d * torch.clamp(eps / n.clamp_min(1e-12), max=1.0)
    return (x + d).clamp(0, 1)


def image_distances(adv: torch.Tensor, x: torch.Tensor) -> dict[str, list[float]]:
    """Per-sample Linf, L2, PSNR (dB, capped at 100) and SSIM of ``adv`` against ``x``."""
    from bench.core.metrics import psnr, ssim

    d = (adv - x).flatten(1)
    return {"linf": d.abs().amax(1).tolist(), "l2": d.norm(dim=1).tolist(),
            "psnr": psnr(adv, x).clamp(max=100.0).tolist(), "ssim": ssim(adv, x).tolist()}


def _infer_dataset(images: torch.Tensor) -> str:
    side = int(images.shape[-1])
    return {16: "test_tiny", 32: "cifar10"}.get(side, "imagenet10")


@ATTACKS.register("wrong_label_latent")
class WrongLabelLatent(Attack):
    """x' = D(E(x, y')) with y' != y, projected to the ball (see the module docstring)."""

    threats: ClassVar[tuple[str, ...]] = ("linf", "l2", "none")
    random: ClassVar[bool] = False

    def __init__(self, *, threat: str | None = None, target: Any = "runner-up",
                 autoencoder: Any = "auto", autoencoder_options: dict[str, Any] | None = None,
                 dataset: str | None = None, store_latents: bool = True, seed: int = 0) -> None:
        if target not in ("runner-up", "random") and not isinstance(target, int):
            raise ValueError(f"target must be 'runner-up', 'random' or a class index, "
                             f"got {target!r}")
        super().__init__(threat=threat, seed=seed, target=target, autoencoder=autoencoder,
                         autoencoder_options=dict(autoencoder_options or {}), dataset=dataset,
                         store_latents=bool(store_latents), kind="semantic")
        self._ae: tuple[nn.Module, str] | None = None

    # the autoencoder --------------------------------------------------------------------------
    def autoencoder(self, defense: nn.Module, images: torch.Tensor,
                    context: RunContext | None = None) -> tuple[nn.Module, str]:
        """The autoencoder for ``defense`` (built once per attack object: one cell)."""
        if self._ae is not None:
            return self._ae
        o = self.options
        ctx = context or RunContext()
        name = o["autoencoder"]
        if not isinstance(name, str):  # a fitted semantic AE (or a defense holding one)
            ae = semantic_autoencoder_of(name)
            if ae is None:
                raise ValueError(f"{type(name).__name__} has no label-conditioned autoencoder")
            self._ae = (ae, type(name).__name__)
            return self._ae
        if name == "auto":
            own = semantic_autoencoder_of(defense)
            if own is not None:
                self._ae = (own, "defense")
                return self._ae
        dataset = o["dataset"] or ctx.dataset or _infer_dataset(images)
        if name == "auto":
            name = DEFAULT_AUTOENCODER.get(dataset, "semantic_ae")
        from bench.artifacts import prepare_defense

        d, info = prepare_defense(name, dict(o["autoencoder_options"]), dataset=dataset,
                                  dataset_options=ctx.dataset_options,
                                  device=str(images.device), preset=ctx.fit_preset,
                                  progress=False, log=lambda m: None)
        ae = semantic_autoencoder_of(d)
        if ae is None:
            raise ValueError(f"{name!r} has no label-conditioned autoencoder (encode(x, y), "
                             "decode(z)); use semantic_ae")
        self._ae = (ae, f"{name} ({info.get('artifact_sha256') or 'untrained'})")
        return self._ae

    # the attack -------------------------------------------------------------------------------
    def run(self, model, images, labels, eps, *, seed, context):
        o = self.options
        defense = unwrap(model)
        ae, source = self.autoencoder(defense, images, context)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            logits = defense(images)
            wrong = choose_wrong_labels(logits, labels, o["target"], gen)
            z = ae.encode(images, labels)
            zw = ae.encode(images, wrong)
            adv = project(ae.decode(zw).clamp(0, 1), images, eps, self.threat)
        n = len(labels)
        extras: dict[str, Any] = {"autoencoder": source,
                                  "image_distances": image_distances(adv, images)}
        extras["examples"] = {"x": _rounded(images[:4], 4), "adv": _rounded(adv[:4], 4)}
        if o["store_latents"]:
            extras["latent"] = {"z_clean": _rounded(z), "z_wrong": _rounded(zw),
                                "labels": labels.tolist(), "wrong_labels": wrong.tolist()}
        return AttackResult(adv=adv, iterations=1, forward_passes=2 * n, backward_passes=0,
                            any_iterate_adversarial=torch.zeros(n, dtype=torch.bool),
                            extras=extras)

    # the cell's report ------------------------------------------------------------------------
    def cell_report(self, extras: Iterable[Mapping[str, Any]], run_dir: str | Path,
                    key: str = "", *, context: RunContext | None = None) -> dict[str, Any]:
        """Aggregate the batches' records into :func:`wrong_label_report`, with the t-SNE figure
        written to ``<run_dir>/figures/wrong_label_latent_<defense>_<key[:12]>.{png,svg}``."""
        extras = list(extras)
        lat = [e["latent"] for e in extras if "latent" in e]
        dist: dict[str, list[float]] = {}
        for e in extras:
            for k, v in (e.get("image_distances") or {}).items():
                dist.setdefault(k, []).extend(v)
        if not lat:
            return {"image": _means(dist)}
        cat = lambda f: [v for b in lat for v in b[f]]  # noqa: E731
        label = (context.defense if context is not None else None) or "defense"
        slug = "".join(ch if ch.isalnum() else "_" for ch in str(label))
        fig = Path(run_dir) / "figures" / f"wrong_label_latent_{slug}_{key[:12]}"
        examples = [e["examples"] for e in extras if "examples" in e]
        try:
            report = wrong_label_report(np.array(cat("z_clean")), np.array(cat("z_wrong")),
                                        np.array(cat("labels")), np.array(cat("wrong_labels")),
                                        distances=dist, figure_path=fig, seed=self.seed)
            if examples:
                xs = torch.tensor([v for b in examples for v in b["x"]])[:8]
                advs = torch.tensor([v for b in examples for v in b["adv"]])[:8]
                grid = picture_grid(xs, advs, fig.with_name(fig.name + "_grid"))
                report.setdefault("figures", []).extend(str(p) for p in grid)
        except Exception as exc:  # noqa: BLE001 - a report must never lose the cell's results
            report = {"image": _means(dist), "error": f"{type(exc).__name__}: {exc}"}
        return report


def _rounded(t: torch.Tensor, digits: int = 5) -> list:
    return np.round(t.detach().float().cpu().numpy(), digits).tolist()


def _means(dist: Mapping[str, list[float]]) -> dict[str, float]:
    return {k: float(np.mean(v)) for k, v in dist.items() if len(v)}


def wrong_label_report(z_clean: Any, z_wrong: Any, labels: Any, wrong_labels: Any, *,
                       distances: Mapping[str, list[float]] | None = None,
                       figure_path: str | Path | None = None, class_names: list[str] | None = None,
                       seed: int = 0) -> dict[str, Any]:
    """Numbers of the wrong-label latent attack.

    ``image``: mean Linf, L2, PSNR, SSIM of x' against x (from ``distances``). ``latent``:
    class centroids are the means of the CLEAN latents ``E(x, y)`` per true class;
    ``clean_nearest_true`` / ``wrong_nearest_wrong`` / ``wrong_nearest_true`` are the fractions
    of clean latents nearest their own class's centroid and of wrong-label latents nearest the
    centroid of ``y'`` / of ``y``; mean distances to those centroids; ``mean_shift`` = mean
    ``||z' - z||``. ``probe``: a standardised logistic regression fitted on the clean latents
    (held-out accuracy on a 30% split as ``clean_accuracy``; None when the cell is too small
    for one held-out point per class), then refitted on all clean latents
    and applied to the wrong-label ones: ``shifted_accuracy`` (true label) and
    ``predicts_wrong_label``. With ``figure_path`` a joint t-SNE of both sets is written
    (PNG+SVG) and listed in ``figures``.
    """
    z = np.asarray(z_clean, dtype=np.float64).reshape(len(z_clean), -1)
    zw = np.asarray(z_wrong, dtype=np.float64).reshape(len(z_wrong), -1)
    y = np.asarray(labels, dtype=np.int64)
    yw = np.asarray(wrong_labels, dtype=np.int64)
    report: dict[str, Any] = {"n": int(len(y)), "image": _means(distances or {})}
    classes = np.unique(y)
    cent = {int(c): z[y == c].mean(0) for c in classes}
    keys = np.array(sorted(cent))
    cmat = np.stack([cent[int(k)] for k in keys])

    def nearest(a: np.ndarray) -> np.ndarray:
        return keys[((a[:, None, :] - cmat[None]) ** 2).sum(-1).argmin(1)]

    def dist_to(a: np.ndarray, lab: np.ndarray) -> float:
        ok = np.isin(lab, keys)
        if not ok.any():
            return float("nan")
        c = np.stack([cent[int(v)] for v in lab[ok]])
        return float(np.linalg.norm(a[ok] - c, axis=1).mean())

    report["latent"] = {
        "clean_nearest_true": float((nearest(z) == y).mean()),
        "wrong_nearest_wrong": float((nearest(zw) == yw).mean()),
        "wrong_nearest_true": float((nearest(zw) == y).mean()),
        "clean_distance_to_true_centroid": dist_to(z, y),
        "wrong_distance_to_true_centroid": dist_to(zw, y),
        "wrong_distance_to_wrong_centroid": dist_to(zw, yw),
        "mean_shift": float(np.linalg.norm(zw - z, axis=1).mean()),
    }
    if len(classes) >= 2 and len(y) >= 10:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        from bench.core.metrics import separation_scores

        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(z, y)
        pred = probe.predict(zw)
        report["probe"] = {"clean_accuracy": None, "clean_silhouette": None,
                           "shifted_accuracy": float((pred == y).mean()),
                           "predicts_wrong_label": float((pred == yw).mean())}
        # the held-out split needs at least one test point per class (small cells skip it)
        frac = max(0.3, len(classes) / len(y))
        if frac <= 0.5:
            sep = separation_scores(z, y, seed=seed, test_fraction=frac)
            report["probe"].update(clean_accuracy=sep["linear_probe_accuracy"],
                                   clean_silhouette=sep["silhouette"])
    if len(classes) >= 2 and len(y) >= 2 * len(classes):
        report["clustering"] = clustering_change(z, zw, y, yw, seed=seed)
    if figure_path is not None and len(y) >= 5:
        report["figures"] = [str(p) for p in tsne_clean_vs_wrong(z, zw, y, yw, figure_path,
                                                                class_names=class_names, seed=seed)]
    return report


def clustering_change(z: np.ndarray, zw: np.ndarray, y: np.ndarray, yw: np.ndarray, *,
                      seed: int = 0) -> dict[str, float]:
    """A clustering that consumes the latent: k-means (k = number of classes, seeded) fitted on
    the CLEAN latents; ``assignment_changed`` is the fraction of inputs whose wrong-label latent
    falls in another cluster than its clean latent; ``clean_ari`` the adjusted Rand index of
    the clean clusters with the true labels; ``wrong_cluster_majority_is_wrong_label`` the
    fraction of wrong-label latents whose cluster's majority class (on clean latents) is y'."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    k = int(len(np.unique(y)))
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(z)
    a, aw = km.labels_, km.predict(zw)
    majority = np.array([np.bincount(y[a == c], minlength=int(y.max()) + 1).argmax()
                         if (a == c).any() else -1 for c in range(k)])
    return {"assignment_changed": float((a != aw).mean()),
            "clean_ari": float(adjusted_rand_score(y, a)),
            "wrong_cluster_majority_is_wrong_label": float((majority[aw] == yw).mean())}


def picture_grid(x: torch.Tensor, adv: torch.Tensor, path: str | Path, *, n: int = 8,
                 amplify: float | None = None) -> list[Path]:
    """Rows: ``x``, ``x'``, ``|x' - x|`` (scaled so its largest value is white, or by
    ``amplify``) for the first ``n`` images; PNG and SVG. The picture users expect beside
    PSNR/SSIM ("visually the same")."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    x, adv = x[:n].detach().float().cpu(), adv[:n].detach().float().cpu()
    diff = (adv - x).abs()
    scale = amplify if amplify is not None else 1.0 / max(float(diff.max()), 1e-12)
    rows = [("x", x), ("x'", adv), (f"|x'-x| x{scale:.0f}", (diff * scale).clamp(0, 1))]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(3, len(x), figsize=(1.3 * len(x), 4.2), squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for c in range(len(x)):
            ax = axes[r][c]
            ax.imshow(imgs[c].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    out = [path.with_suffix(".png"), path.with_suffix(".svg")]
    fig.savefig(out[0], dpi=120)
    fig.savefig(out[1])
    plt.close(fig)
    return out


def tsne_clean_vs_wrong(z: np.ndarray, zw: np.ndarray, y: np.ndarray, yw: np.ndarray,
                        path: str | Path, *, class_names: list[str] | None = None,
                        seed: int = 0, max_points: int = 1000) -> list[Path]:
    """One t-SNE of clean and wrong-label latents together; left: clean latents by true class;
    right: wrong-label latents by the WRONG label used (clean ones in grey), so latents that
    moved to the wrong class's region sit in that class's cluster. Writes PNG and SVG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if len(z) > max_points:
        keep = rng.choice(len(z), max_points, replace=False)
        z, zw, y, yw = z[keep], zw[keep], y[keep], yw[keep]
    both = np.concatenate([z, zw]).astype(np.float32)
    perp = float(min(30.0, max(2.0, (len(both) - 1) / 3.0)))
    emb = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(both)
    ec, ew = emb[: len(z)], emb[len(z):]
    k = int(max(y.max(), yw.max())) + 1
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for cls in range(k):
        name = class_names[cls] if class_names and cls < len(class_names) else str(cls)
        m = y == cls
        if m.any():
            axes[0].scatter(ec[m, 0], ec[m, 1], s=8, color=cmap(cls % cmap.N), label=name)
        m = yw == cls
        if m.any():
            axes[1].scatter(ew[m, 0], ew[m, 1], s=8, color=cmap(cls % cmap.N), marker="x")
    axes[1].scatter(ec[:, 0], ec[:, 1], s=6, color="0.85", zorder=0)
    axes[0].set_title("clean latents E(x, y), by true class")
    axes[1].set_title("wrong-label latents E(x, y'), by y' (clean in grey)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(loc="best", fontsize=7, markerscale=2)
    fig.suptitle("Wrong-label latent attack: clean vs wrong-label latents (joint t-SNE)")
    fig.tight_layout()
    out = [path.with_suffix(".png"), path.with_suffix(".svg")]
    fig.savefig(out[0], dpi=120)
    fig.savefig(out[1])
    plt.close(fig)
    return out
