"""Semantic autoencoder (Ming, Du, Lin, arXiv 2205.15592) as a purifying preprocessor.

What is known (``../shared/METHODS.md`` section 1): a plain autoencoder's latent depends only on
the image; the semantic autoencoder's latent depends on the image AND on the label, which gives
t-SNE plots with clear class boundaries while the decoded images of both autoencoders differ
only faintly.

What is OUR reconstruction (the paper's architecture is not at hand; every point below is a
configurable knob so a later reading of the paper can change it cheaply):

* [reconstruction] Spatial latent (``latent="spatial"``, the default since issue 13): a conv
  trunk on ``x`` (per stage a stride-2 3x3 conv, BatchNorm (``norm``) and ReLU, ``widths``
  channels; by default as many 32-, 64-, ... channel stages as bring the map down to
  ``latent_side`` = 16 px: one stage on CIFAR-10, two at 64 px), one more 3x3 conv, then the label
  embedding (``label_encoding="embedding"``, ``label_embed_dim``; or ``"onehot"``) broadcast
  over the map and concatenated to the features (``label_join="features"``), and a 3x3 conv to
  ``z`` of ``latent_channels`` x 16 x 16 (8 x 16 x 16 = 2,048 numbers for 3,072 pixels on
  CIFAR-10). Measured in 240 CPU-seconds of training each (issue 13): this 16x16x8 latent
  reached 25.6 dB where the earlier 8x8x16 one (two stages) reached 24.2 dB, at a third of
  the cost per step of a 64-channel 16x16 trunk. The
  earlier 64-d dense bottleneck (``latent="dense"``, ``latent_dim``, ``hidden_dim``) is kept
  as a knob: it reconstructs CIFAR-10 at about 21 dB, which cost the classifier behind it most
  of its accuracy. ``label_join="latent"`` appends the label features to ``z`` instead.
* [reconstruction] Decoder ``D(z) -> x_hat`` with NO label input (so ``z`` must carry whatever
  the label contributes): a 3x3 conv, transposed convs retracing the encoder's spatial sizes,
  a 3x3 conv and a sigmoid (outputs in [0, 1]).
* [reconstruction] Loss (:func:`autoencoder_loss`): with a reconstruction loss ALONE we
  measured that the encoder ignores the label (silhouette -0.07 and probe 0.20 on CIFAR-10,
  the plain twin's values), so two terms make ``z`` depend on ``y``:
  a class term ``class_weight * CE(h(z), y)`` with a linear head ``h`` on the flattened
  latent, and a wrong-label term ``wrong_label_weight * [MSE(D(E(x, y')), x) + CE(h(E(x,
  y')), y')]`` with ``y'`` a random wrong label: the latent must follow the GIVEN label while
  the decoded image stays the image. That is the paper's reported behaviour (wrong label ->
  latent in the wrong class's region, decoded image almost unchanged), enforced by training.
  Adam with a cosine schedule, TRUE labels, resumable (a checkpoint per epoch).
* The plain autoencoder is the same networks without ``y`` (``label_conditioned=False``),
  trained by the same loop (data, optimiser, schedule, epochs); its defaults drop the class
  term (``class_weight=0``: the paper's plain AE is reconstruction-only; set it to compare
  against a supervised-latent AE of the image alone), and the wrong-label term does not
  exist without a label input.
* [reconstruction] As a defense: the classifier sees ``D(E(x, y_hat))`` with ``y_hat =
  argmax classifier(x)`` (the label is not known at test time). The classifier can be
  FINE-TUNED on reconstructions (``classifier_finetune_epochs``, ``classifier_finetune_lr``;
  the ``standard`` preset does one epoch): half of each batch the reconstructions, half clean
  images (:func:`finetune_classifier`); the fine-tuned classifier is part of the artifact
  (``classifier_sha256`` stays the starting checkpoint's). The argmax breaks the gradient, so
  the preprocessor declares ``differentiable = False``; its
  :meth:`~SemanticAEPreprocessor.surrogate` is the same AE with the label replaced by a soft
  prediction (see ``surrogate_label``). The plain twin has no argmax, is differentiable, and
  needs no surrogate.

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
#: (local copy or sha256-checked download; 91.7% clean, the baseline users compare with); on
#: ImageNet-10 the stride-2 ResNet-20 of the zoo's ``standard`` recipe, which is shipped
#: (``bench/models/weights``; the earlier ``resnet18_imagenet@quick`` reached 17% train accuracy)
DEFAULT_CLASSIFIERS = {
    "cifar10": "akamaster-resnet20",
    "imagenet10": "resnet20_s2@standard",
    "test_tiny": "test_tiny_cnn@tiny",
}

#: training presets of the semantic / plain autoencoder (an explicit ``epochs`` knob wins)
AE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"epochs": 6},
    "quick": {"epochs": 5},
    # the CPU reference scale (EVALUATION.md "Scales"), resumable. Sized by timing batches of
    # 128 on one thread (issue 13): CIFAR-10 semantic 0.36 s/step idle, about 0.8 s with the
    # machine shared (plain twin 0.19 s), 391 steps an epoch: 10 epochs are 24-52 minutes,
    # plus one fine-tuning epoch of the classifier (about 5 minutes)
    "standard": {"epochs": 10, "classifier_finetune_epochs": 1},
    "full": {"epochs": 40, "classifier_finetune_epochs": 5},
}

#: per-(dataset, preset) changes to :data:`AE_PRESETS` (explicit knobs still win)
AE_DATASET_PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    # ImageNet-10 at 64 px: 3,000 train images, 24 steps an epoch at 2.3 s (idle, one thread):
    # 25 epochs are 23-46 minutes, plus 3 fine-tuning epochs
    ("imagenet10", "standard"): {"epochs": 25, "classifier_finetune_epochs": 3},
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


class SpatialDecoder(nn.Module):
    """A 3x3 conv from the spatial latent (``latent_channels`` x h x w) to the trunk's width,
    transposed convs retracing the encoder's spatial sizes, a 3x3 conv and a sigmoid."""

    def __init__(self, latent_channels: int, image_shape: Sequence[int], widths: Sequence[int],
                 norm: str = "batch") -> None:
        super().__init__()
        c, h, w = image_shape
        self.heights = spatial_sizes(h, len(widths))
        self.widths_px = spatial_sizes(w, len(widths))
        self.widths = tuple(widths)
        self.stem = nn.Sequential(nn.Conv2d(latent_channels, widths[-1], 3, padding=1,
                                            bias=norm == "none"),
                                  _norm(norm, widths[-1]), nn.ReLU(inplace=True))
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
        x = self.stem(z)
        for j, (up, norm) in enumerate(zip(self.ups, self.norms)):
            i = len(self.ups) - 1 - j
            x = F.relu(norm(up(x, output_size=(self.heights[i], self.widths_px[i]))))
        return torch.sigmoid(self.head(x))


def spatial_widths(image_size: int, base: int = 32, cap: int = 256,
                   latent_side: int = 8) -> tuple[int, ...]:
    """Channels per stride-2 stage so the latent map is about ``latent_side`` px (with 8: 32 px
    -> two stages, 64 -> three; with 16: one and two)."""
    stages = max(1, math.ceil(math.log2(max(image_size, 2 * latent_side) / latent_side)))
    return tuple(min(base * 2 ** i, cap) for i in range(stages))


# ----------------------------------------------------------------------------------------------
# the autoencoder
# ----------------------------------------------------------------------------------------------
class SemanticAutoencoder(nn.Module):
    """``E(x, y) -> z``, ``D(z) -> x_hat`` [reconstruction; see the module docstring].

    ``latent="spatial"`` (default): ``z`` is a (``latent_channels``, h, w) map (h = w = 8 on
    CIFAR-10), the label enters as its embedding broadcast over the map and concatenated to the
    trunk features before the last conv. ``latent="dense"``: the earlier design, a
    ``latent_dim`` vector after an MLP (kept for comparison; it reconstructs CIFAR-10 at about
    21 dB). ``class_head`` is the linear classifier on the flattened ``z`` that the class term
    of the loss trains. ``label_conditioned=False`` gives the plain autoencoder: the same
    networks, and ``encode`` ignores ``y``. ``y`` may be class indices (N,) or class
    probabilities (N, K) (a soft label: the embedding rows mixed by the probabilities), which
    the BPDA surrogate uses.
    """

    def __init__(self, image_shape: Sequence[int], num_classes: int, *, latent_dim: int = 64,
                 widths: Sequence[int] | None = None, hidden_dim: int = 256,
                 label_encoding: str = "embedding", label_embed_dim: int = 16,
                 label_conditioned: bool = True, label_join: str = "features",
                 norm: str = "batch", latent: str = "spatial",
                 latent_channels: int = 8, latent_side: int = 16) -> None:
        super().__init__()
        if label_encoding not in ("embedding", "onehot"):
            raise ValueError(f"label_encoding must be 'embedding' or 'onehot', "
                             f"got {label_encoding!r}")
        if label_join not in ("features", "latent"):
            raise ValueError(f"label_join must be 'features' or 'latent', got {label_join!r}")
        if latent not in ("spatial", "dense"):
            raise ValueError(f"latent must be 'spatial' or 'dense', got {latent!r}")
        c, h, w = (int(s) for s in image_shape)
        if widths:
            widths = tuple(widths)
        else:
            widths = (spatial_widths(min(h, w), latent_side=int(latent_side))
                      if latent == "spatial" else default_widths(min(h, w)))
        self.image_shape = (c, h, w)
        self.num_classes = int(num_classes)
        self.latent = latent
        self.label_conditioned = bool(label_conditioned)
        self.label_encoding = label_encoding
        self.label_join = label_join if label_conditioned else "features"
        sizes_h, sizes_w = spatial_sizes(h, len(widths)), spatial_sizes(w, len(widths))
        label_dim = 0
        if self.label_conditioned:
            if label_encoding == "embedding":
                self.label_embedding = nn.Embedding(num_classes, label_embed_dim)
                label_dim = label_embed_dim
            else:
                label_dim = num_classes
        joined = self.label_join == "latent"
        if latent == "spatial":
            self.latent_channels = int(latent_channels)
            self.latent_shape = (self.latent_channels, sizes_h[-1], sizes_w[-1])
            if joined and label_dim >= latent_channels:
                raise ValueError(f"label_join='latent' needs latent_channels > the label's "
                                 f"{label_dim} dims")
            self.trunk_map = nn.Sequential(
                *ConvTrunk(c, widths, norm).net,
                nn.Conv2d(widths[-1], widths[-1], 3, padding=1, bias=norm == "none"),
                _norm(norm, widths[-1]), nn.ReLU(inplace=True))
            out_c = latent_channels - (label_dim if joined else 0)
            self.to_latent = nn.Conv2d(widths[-1] + (0 if joined else label_dim), out_c, 3,
                                       padding=1)
            self.decoder = SpatialDecoder(latent_channels, (c, h, w), widths, norm)
            self.latent_dim = int(latent_channels * sizes_h[-1] * sizes_w[-1])
        else:
            self.latent_dim = int(latent_dim)
            self.latent_shape = (self.latent_dim,)
            self.trunk = ConvTrunk(c, widths, norm)
            flat = widths[-1] * sizes_h[-1] * sizes_w[-1]
            if joined and label_dim >= latent_dim:
                raise ValueError(f"label_join='latent' needs latent_dim > the label's "
                                 f"{label_dim} dims")
            self.encoder_mlp = nn.Sequential(
                nn.Linear(flat + (0 if joined else label_dim), hidden_dim), nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, latent_dim - (label_dim if joined else 0)))
            self.decoder = ConvDecoder(latent_dim, (c, h, w), widths, hidden_dim, norm)
        self.widths = tuple(widths)
        self.class_head = nn.Linear(self.latent_dim, num_classes)

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
        if self.label_conditioned and y is None:
            raise ValueError("the semantic encoder needs a label y (indices or probabilities)")
        if self.latent == "spatial":
            f = self.trunk_map(x)
            if not self.label_conditioned:
                return self.to_latent(f)
            e = self.label_features(y.to(f.device))
            e = e[:, :, None, None].expand(-1, -1, f.shape[2], f.shape[3])
            if self.label_join == "latent":  # z = [conv(trunk(x)), label features]
                return torch.cat([self.to_latent(f), e], dim=1)
            return self.to_latent(torch.cat([f, e], dim=1))
        f = self.trunk(x)
        if not self.label_conditioned:
            return self.encoder_mlp(f)
        e = self.label_features(y.to(f.device))
        if self.label_join == "latent":  # z = [MLP(trunk(x)), label features]
            return torch.cat([self.encoder_mlp(f), e], dim=1)
        return self.encoder_mlp(torch.cat([f, e], dim=1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def classify_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of the class head on the flattened latent (what the class term trains)."""
        return self.class_head(z.flatten(1))

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.encode(x, y))

    forward = reconstruct


def random_wrong_labels(labels: torch.Tensor, num_classes: int,
                        generator: torch.Generator) -> torch.Tensor:
    """A uniformly drawn label different from each true one."""
    off = torch.randint(1, num_classes, labels.shape, generator=generator).to(labels.device)
    return (labels + off) % num_classes


def autoencoder_loss(ae: SemanticAutoencoder, x: torch.Tensor, y: torch.Tensor, *,
                     class_weight: float, wrong_label_weight: float,
                     generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss [reconstruction; METHODS.md section 1]:

    ``MSE(D(E(x, y)), x) + class_weight * CE(h(E(x, y)), y)`` and, for the semantic AE only,
    ``+ wrong_label_weight * [MSE(D(E(x, y')), x) + CE(h(E(x, y')), y')]`` with ``y'`` a random
    wrong label: the latent must follow the GIVEN label (so a wrong one moves it to that
    class's region) while the decoded image stays the image (the paper's "decoded images differ
    only faintly"). ``h`` is the linear class head on the flattened latent.
    """
    z = ae.encode(x, y)
    recon = F.mse_loss(ae.decode(z), x)
    loss = recon
    parts = {"recon": float(recon.detach())}
    if class_weight > 0:
        ce = F.cross_entropy(ae.classify_latent(z), y)
        loss = loss + class_weight * ce
        parts["class"] = float(ce.detach())
    if ae.label_conditioned and wrong_label_weight > 0:
        yw = random_wrong_labels(y, ae.num_classes, generator)
        zw = ae.encode(x, yw)
        wrong = F.mse_loss(ae.decode(zw), x)
        if class_weight > 0:
            wrong = wrong + F.cross_entropy(ae.classify_latent(zw), yw)
        loss = loss + wrong_label_weight * wrong
        parts["wrong_label"] = float(wrong.detach())
    return loss, parts


def train_autoencoder(ae: SemanticAutoencoder, images: torch.Tensor, labels: torch.Tensor, *,
                      epochs: int, lr: float, batch_size: int, weight_decay: float = 0.0,
                      class_weight: float = 0.0, wrong_label_weight: float = 0.0,
                      seed: int = 0, device: str | torch.device = "cpu", progress: bool = True,
                      desc: str = "autoencoder", checkpoint: Any = None,
                      fingerprint: str = "", state_extra: dict[str, Any] | None = None
                      ) -> list[float]:
    """Adam (cosine-annealed) on :func:`autoencoder_loss` with the TRUE labels; returns the
    mean reconstruction MSE of each epoch. With ``checkpoint`` (a path) a resume point is
    written atomically after every epoch (:func:`bench.models.training.save_training_state`)
    and a fit started with the same ``fingerprint`` resumes from it."""
    from tqdm.auto import tqdm

    from bench.models.training import load_training_state, save_training_state

    ae.to(device).train()
    opt = torch.optim.Adam(ae.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = len(images)
    steps = math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps),
                                                       eta_min=lr * 0.05)
    history: list[float] = []
    start_epoch = 0
    if checkpoint is not None:
        state = load_training_state(checkpoint, fingerprint)
        if state is not None and state.get("stage", "autoencoder") == "autoencoder":
            ae.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            history = list(state["history"])
            start_epoch = int(state["epoch"])
        elif state is not None:  # a later stage: the autoencoder is done
            ae.load_state_dict(state["model_ae"])
            ae.eval()
            return list(state["ae_history"])
    with tqdm(total=epochs * steps, initial=start_epoch * steps, desc=desc,
              disable=not progress, leave=False) as bar:
        for epoch in range(start_epoch, epochs):
            perm = torch.randperm(n, generator=gen)
            total = 0.0
            for s in range(steps):
                idx = perm[s * batch_size:(s + 1) * batch_size]
                x = images[idx].to(device, non_blocking=True)
                y = labels[idx].to(device, non_blocking=True)
                loss, parts = autoencoder_loss(ae, x, y, class_weight=class_weight,
                                               wrong_label_weight=wrong_label_weight,
                                               generator=gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += parts["recon"] * len(idx)
                bar.update(1)
            history.append(total / n)
            bar.set_postfix(epoch=epoch + 1, mse=f"{history[-1]:.5f}")
            if checkpoint is not None:
                save_training_state(checkpoint, {
                    "fingerprint": fingerprint, "stage": "autoencoder", "epoch": epoch + 1,
                    "model": {k: v.detach().cpu() for k, v in ae.state_dict().items()},
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                    "history": history, **(state_extra or {})})
    ae.eval()
    return history


def finetune_classifier(classifier: nn.Module, ae: SemanticAutoencoder, images: torch.Tensor,
                        labels: torch.Tensor, *, epochs: int, lr: float, batch_size: int,
                        seed: int = 0, device: str | torch.device = "cpu",
                        progress: bool = True, checkpoint: Any = None, fingerprint: str = "",
                        ae_history: list[float] | None = None) -> list[dict[str, float]]:
    """[reconstruction, METHODS.md section 1: "fine-tune the classifier on reconstructions if
    that is what it takes"] SGD (momentum 0.9, cosine) on batches of which half are the
    reconstructions ``D(E(x, y))`` (the AE frozen, in eval mode) and half the clean images, so
    the classifier behind the purifier learns the reconstructions' look without forgetting
    clean images. Resumable like :func:`train_autoencoder` (the same checkpoint file, stage
    ``"classifier"``). Returns per-epoch loss and train accuracy on the reconstructions."""
    from tqdm.auto import tqdm

    from bench.models.training import load_training_state, save_training_state

    if epochs <= 0:
        return []
    ae.to(device).eval()
    classifier.to(device).train()
    opt = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    n = len(images)
    steps = math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps))
    gen = torch.Generator().manual_seed(seed + 104729)
    history: list[dict[str, float]] = []
    start_epoch = 0
    if checkpoint is not None:
        state = load_training_state(checkpoint, fingerprint)
        if state is not None and state.get("stage") == "classifier":
            classifier.load_state_dict(state["classifier"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            gen.set_state(state["generator"])
            history = list(state["history"])
            start_epoch = int(state["epoch"])
    with tqdm(total=epochs * steps, initial=start_epoch * steps, desc="classifier on recon",
              disable=not progress, leave=False) as bar:
        for epoch in range(start_epoch, epochs):
            perm = torch.randperm(n, generator=gen)
            loss_sum, correct = 0.0, 0
            for s in range(steps):
                idx = perm[s * batch_size:(s + 1) * batch_size]
                x, y = images[idx].to(device), labels[idx].to(device)
                half = len(idx) // 2
                with torch.no_grad():
                    rec = ae.reconstruct(x[:half], y[:half]) if half else x[:0]
                inp = torch.cat([rec, x[half:]])
                logits = classifier(inp)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits[:half].argmax(1) == y[:half]).sum())
                bar.update(1)
            history.append({"epoch": epoch + 1, "loss": loss_sum / n,
                            "recon_train_accuracy": correct / max(1, n // 2)})
            if checkpoint is not None:
                save_training_state(checkpoint, {
                    "fingerprint": fingerprint, "stage": "classifier", "epoch": epoch + 1,
                    "classifier": {k: v.detach().cpu() for k, v in classifier.state_dict().items()},
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "generator": gen.get_state(), "history": history,
                    "model_ae": {k: v.detach().cpu() for k, v in ae.state_dict().items()},
                    "ae_history": list(ae_history or [])})
    classifier.eval()
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

    Knobs: ``latent`` ("spatial" | "dense"), ``latent_channels`` (spatial), ``latent_dim``
    (dense), ``latent_side`` (spatial: the latent map's side when ``widths`` is None),
    ``widths`` (channels per stride-2 stage; None = a ``latent_side`` map for "spatial",
    a 4x4 last map for "dense"), ``hidden_dim`` (dense), ``label_encoding`` ("embedding" |
    "onehot"), ``label_embed_dim``, ``label_join`` ("features" | "latent"), ``norm`` ("batch" |
    "none"), ``class_weight`` and ``wrong_label_weight`` (the loss terms, see
    :func:`autoencoder_loss`), ``epochs`` and ``classifier_finetune_epochs`` (None = the
    preset's), ``classifier_finetune_lr``, ``lr``, ``batch_size``, ``weight_decay``, ``seed``,
    ``train_limit`` (train on at most this many images, seeded; None = the preset's),
    ``surrogate_label`` (BPDA surrogate; does not change the trained artifact), ``resolution``
    (image side for ``imagenet10``). ``preset`` is accepted because the harness passes its
    preset to every constructor; ``fit`` receives it too, and only there does it matter.
    """

    trainable = True

    def __init__(self, *, dataset: str = "cifar10", classifier: str | nn.Module | None = None,
                 device: str = "cpu", progress: bool = False, resolution: int | None = None,
                 label_conditioned: bool = True, latent: str = "spatial",
                 latent_channels: int = 8, latent_side: int = 16, latent_dim: int = 64,
                 widths: Sequence[int] | None = None, hidden_dim: int = 256,
                 label_encoding: str = "embedding", label_embed_dim: int = 16,
                 label_join: str = "features", norm: str = "batch",
                 class_weight: float = 1.0, wrong_label_weight: float = 1.0,
                 epochs: int | None = None, classifier_finetune_epochs: int | None = None,
                 classifier_finetune_lr: float = 0.01,
                 lr: float = 1e-3, batch_size: int = 128,
                 weight_decay: float = 0.0, seed: int = 0, train_limit: int | None = None,
                 surrogate_label: str = "soft",
                 preset: str | None = None) -> None:
        model, sha, spec = resolve_classifier_spec(classifier, dataset, device, progress,
                                                   resolution)
        num_classes, image_shape = dataset_geometry(dataset, resolution)
        if class_weight < 0 or wrong_label_weight < 0:
            raise ValueError("class_weight and wrong_label_weight must be >= 0 (0 disables)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ae = SemanticAutoencoder(image_shape, num_classes, latent_dim=latent_dim, widths=widths,
                                     hidden_dim=hidden_dim, label_encoding=label_encoding,
                                     label_embed_dim=label_embed_dim,
                                     label_conditioned=label_conditioned,
                                     label_join=label_join, norm=norm, latent=latent,
                                     latent_channels=latent_channels, latent_side=latent_side)
        ae.to(device).eval()
        pre = SemanticAEPreprocessor(ae, model, surrogate_label=surrogate_label)
        super().__init__(model, preprocessor=pre, num_classes=num_classes)
        self.dataset = dataset
        self.resolution = resolution
        self.classifier_spec = spec
        self.classifier_sha256 = sha
        self.image_shape = image_shape
        self.knobs = {"label_conditioned": bool(label_conditioned), "latent": latent,
                      "latent_channels": int(latent_channels) if latent == "spatial" else None,
                      "latent_side": int(latent_side) if latent == "spatial" else None,
                      "latent_dim": int(ae.latent_dim), "widths": list(ae.widths),
                      "hidden_dim": int(hidden_dim) if latent == "dense" else None,
                      "label_encoding": label_encoding,
                      "label_embed_dim": int(label_embed_dim) if label_conditioned else None,
                      "label_join": ae.label_join, "norm": norm,
                      "class_weight": float(class_weight),
                      "wrong_label_weight": float(wrong_label_weight),
                      "epochs": epochs, "classifier_finetune_epochs": classifier_finetune_epochs,
                      "classifier_finetune_lr": float(classifier_finetune_lr),
                      "lr": float(lr), "batch_size": int(batch_size),
                      "weight_decay": float(weight_decay), "seed": int(seed),
                      "train_limit": train_limit}
        self.preset = preset
        if preset is not None:
            self.training_settings(preset)  # an unknown preset fails here, early
        self.history: list[float] = []
        self.finetune_history: list[dict[str, float]] = []
        self.fit_info: dict[str, Any] = {}
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
    def training_settings(self, preset: str) -> dict[str, Any]:
        """``epochs``, ``classifier_finetune_epochs``, ``train_limit`` for ``preset`` (the
        dataset's row of :data:`AE_DATASET_PRESETS` over :data:`AE_PRESETS`; explicit knobs
        win)."""
        if preset not in AE_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(AE_PRESETS)}")
        s = {"classifier_finetune_epochs": 0, "train_limit": None, **AE_PRESETS[preset],
             **AE_DATASET_PRESETS.get((self.dataset, preset), {})}
        for k in ("epochs", "classifier_finetune_epochs", "train_limit"):
            if self.knobs[k] is not None:
                s[k] = self.knobs[k]
        return s

    def epochs_for(self, preset: str) -> int:
        return int(self.training_settings(preset)["epochs"])

    def fit(self, train: Any, *, preset: str = "quick", device: str | torch.device = "cpu",
            progress: bool = True, checkpoint: Any = None) -> "SemanticAutoencoderDefense":
        """Train the autoencoder on ``train`` (LabeledImages) with the TRUE labels, then (when
        the preset or knob asks) fine-tune the classifier on reconstructions. With
        ``checkpoint`` a resume point is written after every epoch of either stage."""
        import hashlib
        import json

        settings = self.training_settings(preset)
        images, labels = _check_train(train, self.image_shape, self.num_classes)
        limit = settings["train_limit"]
        if limit is not None and len(images) > limit:
            g = torch.Generator().manual_seed(self.knobs["seed"])
            keep = torch.randperm(len(images), generator=g)[: int(limit)]
            images, labels = images[keep], labels[keep]
        fingerprint = hashlib.sha256(json.dumps(
            {"config": self.config(), "settings": settings, "preset": preset,
             "train": getattr(train, "fingerprint", None), "n": len(labels)},
            sort_keys=True, default=str).encode()).hexdigest()
        self.to(device)
        start = time.perf_counter()
        kind = "semantic" if self.label_conditioned else "plain"
        self.history = train_autoencoder(
            self.ae, images, labels, epochs=int(settings["epochs"]), lr=self.knobs["lr"],
            batch_size=self.knobs["batch_size"], weight_decay=self.knobs["weight_decay"],
            class_weight=self.knobs["class_weight"],
            wrong_label_weight=self.knobs["wrong_label_weight"],
            seed=self.knobs["seed"], device=device, progress=progress, desc=f"{kind} AE",
            checkpoint=checkpoint, fingerprint=fingerprint)
        ae_seconds = time.perf_counter() - start
        self.finetune_history = finetune_classifier(
            self.classifier, self.ae, images, labels,
            epochs=int(settings["classifier_finetune_epochs"]),
            lr=self.knobs["classifier_finetune_lr"], batch_size=self.knobs["batch_size"],
            seed=self.knobs["seed"], device=device, progress=progress, checkpoint=checkpoint,
            fingerprint=fingerprint, ae_history=self.history)
        self.ae.eval()
        self.classifier.eval()
        self.train_seconds = time.perf_counter() - start
        self.fit_info = {"preset": preset, "settings": settings, "train_images": len(labels),
                         "seconds": self.train_seconds, "autoencoder_seconds": ae_seconds,
                         "history": self.history, "finetune_history": self.finetune_history}
        self.fitted = True
        return self

    def config(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "resolution": self.resolution,
                "image_shape": list(self.image_shape), "num_classes": self.num_classes,
                "classifier": self.classifier_spec, "classifier_sha256": self.classifier_sha256,
                **self.knobs, "presets": AE_PRESETS,
                "dataset_presets": {p: v for (d, p), v in AE_DATASET_PRESETS.items()
                                    if d == self.dataset}}


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
    # the paper's plain autoencoder: reconstruction only (the class term is a knob; with it the
    # twin becomes a supervised-latent AE of the image alone)
    kwargs.setdefault("class_weight", 0.0)
    return _named(SemanticAutoencoderDefense(**kwargs), "plain_ae")


_TINY = {"dataset": "test_tiny", "classifier": "test_tiny_cnn@tiny", "latent_channels": 8,
         "latent_dim": 16, "widths": (16, 32), "hidden_dim": 64, "label_embed_dim": 8,
         "batch_size": 32, "lr": 2e-3}


@DEFENSES.register("test_semantic_ae")
def test_semantic_ae(**kwargs: Any) -> SemanticAutoencoderDefense:
    """Tiny semantic AE on ``test_tiny`` for the test-suite."""
    return _named(semantic_ae(**{**_TINY, **kwargs}), "test_semantic_ae")


@DEFENSES.register("test_plain_ae")
def test_plain_ae(**kwargs: Any) -> SemanticAutoencoderDefense:
    """Tiny plain AE on ``test_tiny`` for the test-suite."""
    return _named(plain_ae(**{**_TINY, **kwargs}), "test_plain_ae")
