"""Semantic autoencoder (Ming, Du, Lin, arXiv 2205.15592) as a purifying preprocessor.

What is known (``../shared/METHODS.md`` section 1): a plain autoencoder's latent depends only on
the image; the semantic autoencoder's latent depends on the image AND on the label, which gives
t-SNE plots with clear class boundaries while the decoded images of both autoencoders differ
only faintly.

What is OUR reconstruction (the paper's architecture is not at hand; every point below is a
configurable knob so a later reading of the paper can change it cheaply):

* [reconstruction] Encoder ``E(x, y) -> z``: a conv trunk on ``x`` (per stage a stride-2 3x3
  conv, BatchNorm (``norm``) and ReLU, ``widths`` channels), the label as a learned embedding
  (``label_encoding="embedding"``, ``label_embed_dim``) or a one-hot vector (``"onehot"``)
  concatenated to the flattened trunk features, then an MLP (``hidden_dim``) to ``z``
  (``latent_dim``). This is ``label_join="features"``, the default.
* [reconstruction, an alternative we measured] ``label_join="latent"``: the MLP sees only the
  trunk features and the label features are appended to its output, ``z = [MLP(trunk(x)),
  embed(y)]`` (``latent_dim`` counts both parts). With the default join and MSE alone, nothing
  forces the label into ``z`` (the image already carries it), and on ``test_tiny`` the
  semantic latents separated the classes only slightly better than the plain ones (linear
  probe 0.32-0.34 vs 0.26, silhouettes alike); with ``"latent"`` they separate by construction
  (probe 1.0) while the decoded images change little with the label, which is the behaviour
  the paper reports. Which one the paper means is open.
* [reconstruction] Decoder ``D(z) -> x_hat`` with NO label input (so ``z`` must carry whatever
  the label contributes): an MLP back to the trunk's last feature map, transposed convs that
  retrace the encoder's spatial sizes, a 3x3 conv and a sigmoid (outputs in [0, 1]).
* [reconstruction] Loss: reconstruction MSE only, trained with Adam on the TRUE labels.
* The plain autoencoder is the same networks without ``y`` (``label_conditioned=False``).
* As a defense: the classifier sees ``D(E(x, y_hat))`` with ``y_hat = argmax classifier(x)``
  (the label is not known at test time). The argmax breaks the gradient, so the preprocessor
  declares ``differentiable = False``; its :meth:`~SemanticAEPreprocessor.surrogate` is the same
  AE with the label replaced by a soft prediction (see ``surrogate_label``). The plain twin has
  no argmax, is differentiable, and needs no surrogate.

Registered as ``semantic_ae``, ``plain_ae`` (the plain twin), and ``test_semantic_ae`` /
``test_plain_ae`` (tiny, on ``test_tiny``).
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench.core.registry import DEFENSES
from defenses.base import Defense, Preprocessor

#: the classifier each dataset uses when none is given: the pinned akamaster ResNet-20 on CIFAR-10
#: (local copy or sha256-checked download; 91.7% clean, the baseline users compare with), else a
#: zoo architecture trained once by the quick recipe and cached
DEFAULT_CLASSIFIERS = {
    "cifar10": "akamaster-resnet20",
    "imagenet10": "resnet18_imagenet@quick",
    "test_tiny": "test_tiny_cnn@tiny",
}

#: training presets of the semantic / plain autoencoder (an explicit ``epochs`` knob wins)
AE_PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"epochs": 5},
    "full": {"epochs": 40},
}


# ----------------------------------------------------------------------------------------------
# helpers shared with the AAE detector
# ----------------------------------------------------------------------------------------------
def dataset_geometry(dataset: str, resolution: int | None = None
                     ) -> tuple[int, tuple[int, int, int]]:
    """(num_classes, (C, H, W)) of ``dataset`` images, at ``resolution`` if given."""
    num_classes, shape = None, None
    from bench.data import dataset_info

    info = dataset_info(dataset, resolution=resolution)
    num_classes, shape = int(info.num_classes), tuple(int(s) for s in info.shape)
    if resolution is not None:
        shape = (shape[0], int(resolution), int(resolution))
    return num_classes, tuple(int(s) for s in shape)  # type: ignore[return-value]


def default_widths(image_size: int, base: int = 32, cap: int = 256) -> tuple[int, ...]:
    """Channels per stride-2 stage so the last feature map is about 4x4 (32 px -> 3 stages)."""
    stages = max(1, math.ceil(math.log2(max(image_size, 8) / 4)))
    return tuple(min(base * 2 ** i, cap) for i in range(stages))


def resolve_classifier_spec(classifier: str | nn.Module | None, dataset: str, device: str,
                            progress: bool, resolution: int | None = None
                            ) -> tuple[nn.Module, str, str]:
    """(module in eval mode, sha256, spec name) through ``bench.models.resolve_classifier``."""
    if classifier is None:
        if dataset not in DEFAULT_CLASSIFIERS:
            raise ValueError(f"no default classifier for dataset {dataset!r}: pass classifier=")
        classifier = DEFAULT_CLASSIFIERS[dataset]
    spec = classifier if isinstance(classifier, str) else type(classifier).__name__
    from bench.models import resolve_classifier

    kwargs: dict[str, Any] = {"dataset": dataset, "device": device, "progress": progress}
    if resolution is not None and "resolution" in inspect.signature(resolve_classifier).parameters:
        kwargs["resolution"] = resolution
    model, sha = resolve_classifier(classifier, **kwargs)
    return model.eval(), sha, spec


def spatial_sizes(size: int, stages: int) -> list[int]:
    """Spatial size before each stride-2 stage and after the last: [H, ceil(H/2), ...]."""
    sizes = [size]
    for _ in range(stages):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch' or 'none', got {kind!r}")


class ConvTrunk(nn.Module):
    """Per stage: stride-2 3x3 conv, norm, ReLU; output flattened (N, widths[-1] * h * w)."""

    def __init__(self, in_channels: int, widths: Sequence[int], norm: str = "batch") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1, bias=norm == "none"),
                       _norm(norm, w), nn.ReLU(inplace=True)]
            c = w
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)


class ConvDecoder(nn.Module):
    """MLP from ``z`` to the trunk's last feature map, transposed convs retracing the encoder's
    spatial sizes exactly (odd sizes included), a 3x3 conv and a sigmoid."""

    def __init__(self, latent_dim: int, image_shape: Sequence[int], widths: Sequence[int],
                 hidden_dim: int, norm: str = "batch") -> None:
        super().__init__()
        c, h, w = image_shape
        self.heights = spatial_sizes(h, len(widths))
        self.widths_px = spatial_sizes(w, len(widths))
        self.widths = tuple(widths)
        flat = widths[-1] * self.heights[-1] * self.widths_px[-1]
        self.mlp = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, flat), nn.ReLU(inplace=True))
        ups, norms = [], []
        for i in reversed(range(len(widths))):
            out = widths[i - 1] if i > 0 else widths[0]
            ups.append(nn.ConvTranspose2d(widths[i], out, 3, stride=2, padding=1,
                                          bias=norm == "none"))
            norms.append(_norm(norm, out))
        self.ups = nn.ModuleList(ups)
        self.norms = nn.ModuleList(norms)
        self.head = nn.Conv2d(widths[0], c, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n = z.shape[0]
        x = self.mlp(z).view(n, self.widths[-1], self.heights[-1], self.widths_px[-1])
        for j, (up, norm) in enumerate(zip(self.ups, self.norms)):
            i = len(self.ups) - 1 - j  # stage being undone: back to sizes[i]
            x = F.relu(norm(up(x, output_size=(self.heights[i], self.widths_px[i]))))
        return torch.sigmoid(self.head(x))


# ----------------------------------------------------------------------------------------------
# the autoencoder
# ----------------------------------------------------------------------------------------------
class SemanticAutoencoder(nn.Module):
    """``E(x, y) -> z``, ``D(z) -> x_hat`` [reconstruction; see the module docstring].

    ``label_conditioned=False`` gives the plain autoencoder: the same networks, and ``encode``
    ignores ``y``. ``y`` may be class indices (N,) or class probabilities (N, K) (a soft label:
    the embedding rows mixed by the probabilities), which the BPDA surrogate uses.
    """

    def __init__(self, image_shape: Sequence[int], num_classes: int, *, latent_dim: int = 64,
                 widths: Sequence[int] | None = None, hidden_dim: int = 256,
                 label_encoding: str = "embedding", label_embed_dim: int = 16,
                 label_conditioned: bool = True, label_join: str = "features",
                 norm: str = "batch") -> None:
        super().__init__()
        if label_encoding not in ("embedding", "onehot"):
            raise ValueError(f"label_encoding must be 'embedding' or 'onehot', "
                             f"got {label_encoding!r}")
        if label_join not in ("features", "latent"):
            raise ValueError(f"label_join must be 'features' or 'latent', got {label_join!r}")
        c, h, w = (int(s) for s in image_shape)
        widths = tuple(widths) if widths else default_widths(min(h, w))
        self.image_shape = (c, h, w)
        self.num_classes = int(num_classes)
        self.latent_dim = int(latent_dim)
        self.label_conditioned = bool(label_conditioned)
        self.label_encoding = label_encoding
        self.label_join = label_join if label_conditioned else "features"
        self.trunk = ConvTrunk(c, widths, norm)
        sizes_h, sizes_w = spatial_sizes(h, len(widths)), spatial_sizes(w, len(widths))
        flat = widths[-1] * sizes_h[-1] * sizes_w[-1]
        label_dim = 0
        if self.label_conditioned:
            if label_encoding == "embedding":
                self.label_embedding = nn.Embedding(num_classes, label_embed_dim)
                label_dim = label_embed_dim
            else:
                label_dim = num_classes
        joined = self.label_join == "latent"
        if joined and label_dim >= latent_dim:
            raise ValueError(f"label_join='latent' needs latent_dim > the label's {label_dim} dims")
        self.encoder_mlp = nn.Sequential(
            nn.Linear(flat + (0 if joined else label_dim), hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, latent_dim - (label_dim if joined else 0)))
        self.decoder = ConvDecoder(latent_dim, (c, h, w), widths, hidden_dim, norm)

    def label_features(self, y: torch.Tensor) -> torch.Tensor:
        if y.dim() == 1:  # hard labels
            if self.label_encoding == "embedding":
                return self.label_embedding(y.long())
            return F.one_hot(y.long(), self.num_classes).float()
        probs = y.float()  # soft labels (N, K)
        if self.label_encoding == "embedding":
            return probs @ self.label_embedding.weight
        return probs

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        f = self.trunk(x)
        if not self.label_conditioned:
            return self.encoder_mlp(f)
        if y is None:
            raise ValueError("the semantic encoder needs a label y (indices or probabilities)")
        e = self.label_features(y.to(f.device))
        if self.label_join == "latent":  # z = [MLP(trunk(x)), label features]
            return torch.cat([self.encoder_mlp(f), e], dim=1)
        return self.encoder_mlp(torch.cat([f, e], dim=1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.encode(x, y))

    forward = reconstruct


def train_autoencoder(ae: SemanticAutoencoder, images: torch.Tensor, labels: torch.Tensor, *,
                      epochs: int, lr: float, batch_size: int, weight_decay: float = 0.0,
                      seed: int = 0, device: str | torch.device = "cpu", progress: bool = True,
                      desc: str = "autoencoder") -> list[float]:
    """Adam on reconstruction MSE with the TRUE labels; returns the mean loss of each epoch."""
    from tqdm.auto import tqdm

    ae.to(device).train()
    opt = torch.optim.Adam(ae.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = len(images)
    steps = math.ceil(n / batch_size)
    history: list[float] = []
    with tqdm(total=epochs * steps, desc=desc, disable=not progress, leave=False) as bar:
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=gen)
            total = 0.0
            for s in range(steps):
                idx = perm[s * batch_size:(s + 1) * batch_size]
                x = images[idx].to(device, non_blocking=True)
                y = labels[idx].to(device, non_blocking=True)
                loss = F.mse_loss(ae(x, y), x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                bar.update(1)
            history.append(total / n)
            bar.set_postfix(epoch=epoch + 1, mse=f"{history[-1]:.5f}")
    ae.eval()
    return history


# ----------------------------------------------------------------------------------------------
# the preprocessor and the defense
# ----------------------------------------------------------------------------------------------
class SemanticAESurrogate(nn.Module):
    """Differentiable stand-in for BPDA: ``D(E(x, label(x)))`` where label(x) is

    * ``"soft"``: the classifier's softmax probabilities, NOT detached, so the gradient also
      flows through the label path (the embedding rows are mixed by the probabilities);
    * ``"detached"``: the same probabilities, detached (gradient through the AE only);
    * ``"hard"``: the detached argmax, i.e. the real forward with the label held fixed (its
      gradient equals the real one wherever the predicted label does not change).
    """

    def __init__(self, ae: SemanticAutoencoder, classifier: nn.Module, mode: str = "soft") -> None:
        super().__init__()
        self.ae = ae
        self.classifier = classifier
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(x)
        if self.mode == "hard":
            y = logits.argmax(1).detach()
        else:
            y = logits.softmax(1)
            if self.mode == "detached":
                y = y.detach()
        return self.ae.reconstruct(x, y)


class SemanticAEPreprocessor(Preprocessor):
    """``x -> D(E(x, argmax classifier(x)))`` (plain twin: ``x -> D(E(x))``)."""

    SURROGATE_MODES = ("soft", "detached", "hard")

    def __init__(self, ae: SemanticAutoencoder, classifier: nn.Module,
                 surrogate_label: str = "soft") -> None:
        super().__init__()
        if surrogate_label not in self.SURROGATE_MODES:
            raise ValueError(f"surrogate_label must be one of {self.SURROGATE_MODES}, "
                             f"got {surrogate_label!r}")
        self.ae = ae
        # the classifier is the defense's own module: keep a plain reference so its weights are
        # not registered (and saved) twice
        self.__dict__["_classifier"] = classifier
        self.surrogate_label = surrogate_label
        self.differentiable = not ae.label_conditioned

    @property
    def label_conditioned(self) -> bool:
        return self.ae.label_conditioned

    @torch.no_grad()
    def predict_labels(self, x: torch.Tensor) -> torch.Tensor:
        return self.__dict__["_classifier"](x).argmax(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.predict_labels(x) if self.ae.label_conditioned else None
        return self.ae.reconstruct(x, y)

    def surrogate(self) -> nn.Module | None:
        if not self.ae.label_conditioned:
            return None  # the plain AE is differentiable as it is
        return SemanticAESurrogate(self.ae, self.__dict__["_classifier"], self.surrogate_label)


class SemanticAutoencoderDefense(Defense):
    """A classifier behind a (semantic or plain) autoencoder purifier; see the module docstring.

    Knobs: ``latent_dim``, ``widths`` (channels per stride-2 stage; None = about 4x4 last map),
    ``hidden_dim``, ``label_encoding`` ("embedding" | "onehot"), ``label_embed_dim``,
    ``label_join`` ("features" | "latent"), ``norm`` ("batch" | "none"), ``epochs``
    (None = the preset's), ``lr``, ``batch_size``, ``weight_decay``, ``seed``, ``train_limit``
    (train on at most this many images, seeded), ``surrogate_label`` (BPDA surrogate; does not
    change the trained artifact), ``resolution`` (image side for ``imagenet10``). ``preset`` is
    accepted because the harness passes its preset to every constructor; ``fit`` receives it too,
    and only there does it matter.
    """

    trainable = True

    def __init__(self, *, dataset: str = "cifar10", classifier: str | nn.Module | None = None,
                 device: str = "cpu", progress: bool = False, resolution: int | None = None,
                 label_conditioned: bool = True, latent_dim: int = 64,
                 widths: Sequence[int] | None = None, hidden_dim: int = 256,
                 label_encoding: str = "embedding", label_embed_dim: int = 16,
                 label_join: str = "features", norm: str = "batch", epochs: int | None = None,
                 lr: float = 1e-3, batch_size: int = 128,
                 weight_decay: float = 0.0, seed: int = 0, train_limit: int | None = None,
                 surrogate_label: str = "soft",
                 preset: str | None = None) -> None:
        model, sha, spec = resolve_classifier_spec(classifier, dataset, device, progress,
                                                   resolution)
        num_classes, image_shape = dataset_geometry(dataset, resolution)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ae = SemanticAutoencoder(image_shape, num_classes, latent_dim=latent_dim, widths=widths,
                                     hidden_dim=hidden_dim, label_encoding=label_encoding,
                                     label_embed_dim=label_embed_dim,
                                     label_conditioned=label_conditioned,
                                     label_join=label_join, norm=norm)
        ae.to(device).eval()
        pre = SemanticAEPreprocessor(ae, model, surrogate_label=surrogate_label)
        super().__init__(model, preprocessor=pre, num_classes=num_classes)
        self.dataset = dataset
        self.resolution = resolution
        self.classifier_spec = spec
        self.classifier_sha256 = sha
        self.image_shape = image_shape
        self.knobs = {"label_conditioned": bool(label_conditioned), "latent_dim": int(latent_dim),
                      "widths": list(ae.decoder.widths), "hidden_dim": int(hidden_dim),
                      "label_encoding": label_encoding,
                      "label_embed_dim": int(label_embed_dim) if label_conditioned else None,
                      "label_join": ae.label_join, "norm": norm,
                      "epochs": epochs, "lr": float(lr), "batch_size": int(batch_size),
                      "weight_decay": float(weight_decay), "seed": int(seed),
                      "train_limit": train_limit}
        self.history: list[float] = []
        self.train_seconds: float | None = None

    # what the wrong-label latent attack and the reports use -----------------------------------
    @property
    def ae(self) -> SemanticAutoencoder:
        return self.preprocessor.ae  # type: ignore[union-attr]

    @property
    def label_conditioned(self) -> bool:
        return self.ae.label_conditioned

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.require_fitted()
        return self.ae.encode(x, y)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.require_fitted()
        return self.ae.decode(z)

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.require_fitted()
        return self.ae.reconstruct(x, y)

    def predict_labels(self, x: torch.Tensor) -> torch.Tensor:
        return self.preprocessor.predict_labels(x)  # type: ignore[union-attr]

    # training --------------------------------------------------------------------------------
    def epochs_for(self, preset: str) -> int:
        if self.knobs["epochs"] is not None:
            return int(self.knobs["epochs"])
        if preset not in AE_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(AE_PRESETS)}")
        return int(AE_PRESETS[preset]["epochs"])

    def fit(self, train: Any, *, preset: str = "quick", device: str | torch.device = "cpu",
            progress: bool = True) -> "SemanticAutoencoderDefense":
        """Train the autoencoder on ``train`` (LabeledImages) with the TRUE labels."""
        epochs = self.epochs_for(preset)
        images, labels = _check_train(train, self.image_shape, self.num_classes)
        if self.knobs["train_limit"] is not None and len(images) > self.knobs["train_limit"]:
            g = torch.Generator().manual_seed(self.knobs["seed"])
            keep = torch.randperm(len(images), generator=g)[: self.knobs["train_limit"]]
            images, labels = images[keep], labels[keep]
        self.to(device)
        start = time.perf_counter()
        kind = "semantic" if self.label_conditioned else "plain"
        self.history = train_autoencoder(
            self.ae, images, labels, epochs=epochs, lr=self.knobs["lr"],
            batch_size=self.knobs["batch_size"], weight_decay=self.knobs["weight_decay"],
            seed=self.knobs["seed"], device=device, progress=progress, desc=f"{kind} AE")
        self.train_seconds = time.perf_counter() - start
        self.fitted = True
        return self

    def config(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "resolution": self.resolution,
                "image_shape": list(self.image_shape), "num_classes": self.num_classes,
                "classifier": self.classifier_spec, "classifier_sha256": self.classifier_sha256,
                **self.knobs, "presets": AE_PRESETS}


def _check_train(train: Any, image_shape: Sequence[int], num_classes: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (images, labels) of a LabeledImages, checked against the nets' geometry."""
    images, labels = train.images, train.labels
    if tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(f"training images have shape {tuple(images.shape[1:])} but the defense "
                         f"was built for {tuple(image_shape)}: pass resolution= (imagenet10) or "
                         f"load the matching dataset")
    if num_classes is not None and len(labels) and int(labels.max()) >= num_classes:
        raise ValueError(f"label {int(labels.max())} out of range for {num_classes} classes")
    return images.float(), labels.long()


# ----------------------------------------------------------------------------------------------
# registry entries
# ----------------------------------------------------------------------------------------------
def _named(defense: Defense, name: str) -> Defense:
    defense.registry_name = name  # for error messages ("robustmatrix fit <name>")
    return defense


@DEFENSES.register("semantic_ae")
def semantic_ae(**kwargs: Any) -> SemanticAutoencoderDefense:
    """Semantic autoencoder purifier: the classifier sees D(E(x, predicted label))."""
    kwargs["label_conditioned"] = True
    return _named(SemanticAutoencoderDefense(**kwargs), "semantic_ae")


@DEFENSES.register("plain_ae")
def plain_ae(**kwargs: Any) -> SemanticAutoencoderDefense:
    """The plain twin of ``semantic_ae``: the same networks, the encoder ignores the label."""
    kwargs["label_conditioned"] = False
    return _named(SemanticAutoencoderDefense(**kwargs), "plain_ae")


_TINY = {"dataset": "test_tiny", "classifier": "test_tiny_cnn@tiny", "latent_dim": 16,
         "widths": (16, 32), "hidden_dim": 64, "label_embed_dim": 8, "epochs": 6,
         "batch_size": 32, "lr": 2e-3}


@DEFENSES.register("test_semantic_ae")
def test_semantic_ae(**kwargs: Any) -> SemanticAutoencoderDefense:
    """Tiny semantic AE on ``test_tiny`` for the test-suite."""
    return _named(semantic_ae(**{**_TINY, **kwargs}), "test_semantic_ae")


@DEFENSES.register("test_plain_ae")
def test_plain_ae(**kwargs: Any) -> SemanticAutoencoderDefense:
    """Tiny plain AE on ``test_tiny`` for the test-suite."""
    return _named(plain_ae(**{**_TINY, **kwargs}), "test_plain_ae")
