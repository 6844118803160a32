"""The dataset interface: :class:`LabeledImages`, the loaders and the decoded-tensor cache.

Every dataset (``cifar10``, ``imagenet10``, ``test_tiny``) is an :class:`ImageDataset` subclass
registered in :data:`bench.core.registry.DATASETS`; the module-level functions below are the
interface the rest of the harness codes against (``docs/architecture.md``).

Order and ids. A loaded split is in class-major order: by label, then by the image's position
within its class (its file name in a tree). Sample ids are ``"<dataset>/<split>/<label>/<stem>"``
(``"cifar10/test/3/0000"``), so the same original image gets the same id from every source
(JPEG tree, lossless CSV, torchvision), and the fingerprint, a sha256 over the dataset name,
source kind, split, resolution and the ids, is the same on every machine.

Cache. Images decoded from a folder tree are stored as uint8 tensors in
``<cache_dir>/decoded/<name>.safetensors``, keyed by dataset, source, split, resolution and a
cheap signature of the tree (relative file names and sizes), so a second load reads one file
instead of decoding thousands of JPEGs. Each file carries the sha256 of what it holds (images,
labels, ids), checked on every read together with the tensors' dtype, shape and label range;
a file that fails (modified on disk, or written before content hashes) is decoded again, with
one warning line. The pixel hash of the images a run evaluates
(:attr:`LabeledImages.pixel_sha256`) is part of every cell's key and provenance.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor

from bench.core import paths
from bench.core.registry import DATASETS

log = logging.getLogger(__name__)

#: bump when the decoded layout or the decoding itself changes (old cache files are ignored)
CACHE_FORMAT = "1"
#: file name extensions read from a class-folder tree (case-insensitive)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SOURCES = ("auto", "jpeg-tree", "lossless-csv", "torchvision", "synthetic")
BAD_IMAGE_POLICIES = ("error", "skip")


class DataError(ValueError):
    """A missing, unreadable or unusable dataset. ``str()`` is one line naming the fix."""


# ----------------------------------------------------------------------------------------------
# the two records
# ----------------------------------------------------------------------------------------------
def compute_fingerprint(dataset: str, source: str, split: str, resolution: int,
                        sample_ids: Sequence[str]) -> str:
    """sha256 over what identifies the images, and nothing machine-specific (no paths)."""
    h = hashlib.sha256()
    h.update(json.dumps([dataset, source, split, int(resolution)]).encode())
    for sid in sample_ids:
        h.update(b"\n" + sid.encode())
    return h.hexdigest()


@dataclass
class LabeledImages:
    """Images with labels and stable per-sample ids.

    ``images`` are float32 (N, C, H, W) in [0, 1] on the CPU; ``labels`` int64 (N,).
    ``skipped`` counts the bad images left out under ``on_bad_image="skip"``.
    """

    images: Tensor
    labels: Tensor
    sample_ids: list[str]
    classes: list[str]
    dataset: str
    source: str
    fingerprint: str = ""
    split: str = ""
    skipped: int = 0

    def __post_init__(self) -> None:
        n = len(self.sample_ids)
        if self.images.shape[0] != n or self.labels.shape[0] != n:
            raise ValueError(f"LabeledImages: {self.images.shape[0]} images, "
                             f"{self.labels.shape[0]} labels and {n} sample ids")
        if not self.fingerprint:
            self.fingerprint = compute_fingerprint(self.dataset, self.source, self.split,
                                                   self.resolution, self.sample_ids)

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def pixel_sha256(self) -> str:
        """sha256 of the pixels and labels themselves (:func:`state_dict_sha256` of the two
        tensors): part of every cell's key and provenance, so a cell computed on other pixels
        under the same sample ids (a modified cache, a changed decoder) is never reused."""
        from bench.core.hashing import state_dict_sha256

        cached = self.__dict__.get("_pixel_sha256")
        if cached is None or cached[0] is not self.images or cached[1] is not self.labels:
            cached = (self.images, self.labels,
                      state_dict_sha256({"images": self.images, "labels": self.labels}))
            self.__dict__["_pixel_sha256"] = cached
        return cached[2]

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1]) if self.images.ndim == 4 else 0

    def subset(self, index: Any) -> LabeledImages:
        """The examples at ``index`` (ints, a slice, a bool mask or an int tensor/array), in that
        order, with their own fingerprint."""
        if isinstance(index, slice):
            idx = torch.arange(len(self))[index]
        else:
            idx = torch.as_tensor(np.asarray(index) if not isinstance(index, Tensor) else index)
            if idx.dtype == torch.bool:
                if idx.shape != (len(self),):
                    raise IndexError(f"bool mask of shape {tuple(idx.shape)} for "
                                     f"{len(self)} images")
                idx = idx.nonzero().flatten()
            idx = idx.long().flatten()
        ids = [self.sample_ids[i] for i in idx.tolist()]
        return replace(self, images=self.images[idx], labels=self.labels[idx], sample_ids=ids,
                       fingerprint="")

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()


@dataclass(frozen=True)
class DatasetInfo:
    """What the harness needs to know about a dataset without loading it.

    ``image_size`` is the side of the (square) images at the chosen resolution; ``shape`` is
    ``(channels, image_size, image_size)``. ``default_eps`` maps a threat model (``"linf"``,
    ``"l2"``) to the benchmark's default budget for images in [0, 1].
    """

    name: str
    num_classes: int
    classes: list[str]
    image_size: int
    default_eps: dict[str, float]
    channels: int = 3

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)


# ----------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------
class BadImage(Exception):
    """An image that cannot be used (corrupt, wrong size); the message says why."""


def resize_square(img: Tensor, resolution: int) -> Tensor:
    """uint8 (..., C, H, W) -> (..., C, r, r): shorter side to ``r`` (bilinear, antialiased),
    then the centre crop."""
    if img.shape[-2:] == (resolution, resolution):
        return img
    import torchvision.transforms.v2.functional as F

    img = F.resize(img, resolution, antialias=True)
    return F.center_crop(img, [resolution, resolution])


def _decode_image(path: str | Path, resolution: int, native_size: int | None) -> Tensor:
    """One image file -> uint8 (3, r, r). Grayscale, CMYK, palette and alpha become RGB.

    Pillow decodes (torchvision.io's decoders are deprecated since torchvision 0.29; on these
    files they give identical pixels). Raises :class:`BadImage`.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.array(im if im.mode == "RGB" else im.convert("RGB"))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
            SyntaxError, EOFError) as exc:
        raise BadImage(f"cannot be decoded ({type(exc).__name__}: {exc})") from None
    h, w = arr.shape[:2]
    if native_size is not None and (h, w) != (native_size, native_size):
        raise BadImage(f"is {h}x{w}, expected {native_size}x{native_size}")
    if min(h, w) < 1:
        raise BadImage("is empty")
    img = torch.from_numpy(arr).permute(2, 0, 1)
    return img if (h, w) == (resolution, resolution) else resize_square(img, resolution)


def _decode_chunk(files: Sequence[str | Path], resolution: int, native_size: int | None
                  ) -> list[Tensor | BadImage]:
    out: list[Tensor | BadImage] = []
    for f in files:
        try:
            out.append(_decode_image(f, resolution, native_size))
        except BadImage as exc:
            out.append(exc)
    return out


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def decode_files(files: Sequence[str | Path], resolution: int, *, native_size: int | None = None,
                 on_bad_image: str = "error", progress: bool = False, desc: str = "decoding",
                 num_workers: int | None = None, display_root: Path | None = None
                 ) -> tuple[Tensor, list[int], list[str]]:
    """Decode ``files`` in a thread pool. Pillow releases the GIL inside the JPEG decoder, so
    threads pay off for larger images; for 32x32 ones its Python-level header parsing
    dominates (about 0.3 ms per CIFAR image on one core).

    Returns (uint8 (M, 3, r, r), kept indices into ``files``, one "file: reason" per skipped
    image). Under ``on_bad_image="error"`` the first bad image raises :class:`DataError`.
    """
    from tqdm.auto import tqdm

    n = len(files)
    out = torch.empty((n, 3, resolution, resolution), dtype=torch.uint8)
    kept: list[int] = []
    bad: list[str] = []
    chunk = 256
    starts = list(range(0, n, chunk))
    workers = min(num_workers or default_workers(), max(1, len(starts)))
    with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_decode_chunk, files[s:s + chunk], resolution, native_size)
                   for s in starts]
        try:
            for s, fut in zip(starts, futures, strict=True):
                for j, res in enumerate(fut.result()):
                    if isinstance(res, BadImage):
                        if on_bad_image == "error":
                            raise DataError(
                                f"bad image {files[s + j]}: {res}; fix or remove it, or pass "
                                f"on_bad_image='skip'")
                        shown = str(files[s + j])
                        if display_root is not None:
                            shown = os.path.relpath(shown, display_root)
                        bad.append(f"{shown}: {res}")
                        continue
                    out[len(kept)] = res
                    kept.append(s + j)
                bar.update(len(fut.result()))
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return out[:len(kept)], kept, bad


# ----------------------------------------------------------------------------------------------
# class-folder trees
# ----------------------------------------------------------------------------------------------
@dataclass
class TreeListing:
    root: Path                       # the split folder that holds the class folders
    files: list[str]                 # paths as strings (50k Path objects cost seconds)
    labels: list[int]
    stems: list[str]
    signature_lines: list[str] = field(default_factory=list)

    def signature(self) -> str:
        """Cheap content signature: relative names and sizes (no absolute paths, no mtimes)."""
        return hashlib.sha256("\n".join(self.signature_lines).encode()).hexdigest()


def _scan_class_folder(folder: Path) -> list[tuple[str, str, int]]:
    """(name, path, size) of the image files in ``folder``, sorted by name."""
    with os.scandir(folder) as it:
        entries = [(e.name, e.path, e.stat().st_size) for e in it
                   if e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith(".")
                   and e.is_file()]
    return sorted(entries)


def list_tree(split_dir: Path, folder_names: Sequence[str], on_bad_image: str) -> TreeListing:
    """The images of an ImageFolder-style split folder, in label order then file-name order."""
    present = {p.name for p in split_dir.iterdir() if p.is_dir()}
    missing = [f for f in folder_names if f not in present]
    if missing:
        raise DataError(f"class folder(s) {', '.join(missing)} missing under {split_dir}; "
                        f"expected one folder per class: {', '.join(folder_names)}")
    extra = sorted(present - set(folder_names) - {n for n in present if n.startswith(".")})
    if extra:
        warnings.warn(f"ignoring folders {extra} under {split_dir} (not classes of this dataset)",
                      stacklevel=3)
    listing = TreeListing(split_dir, [], [], [])
    for label, folder in enumerate(folder_names):
        entries = _scan_class_folder(split_dir / folder)
        if not entries:
            msg = f"class folder {split_dir / folder} has no images"
            if on_bad_image == "error":
                raise DataError(f"{msg}; add its images, or pass on_bad_image='skip'")
            warnings.warn(msg, stacklevel=3)
            listing.signature_lines.append(f"{folder}/")
        for name, path, size in entries:
            listing.files.append(path)
            listing.labels.append(label)
            listing.stems.append(os.path.splitext(name)[0])
            listing.signature_lines.append(f"{folder}/{name}:{size}")
    return listing


# ----------------------------------------------------------------------------------------------
# the decoded-tensor cache
# ----------------------------------------------------------------------------------------------
def _cache_file(cache_root: Path, dataset: str, source: str, split: str, resolution: int,
                signature: str) -> Path:
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, dataset, source, split, resolution,
                                     signature]).encode()).hexdigest()[:20]
    return cache_root / "decoded" / f"{dataset}-{split}-{source}-{resolution}px-{key}.safetensors"


def cache_content_sha256(images: Tensor, labels: Tensor, ids: list[str],
                         skipped: list[str]) -> str:
    """What a decoded-cache file holds, hashed: the uint8 images, the labels, the sample ids and
    the skipped-image notes (checked on every read)."""
    from bench.core.hashing import json_sha256, state_dict_sha256

    return json_sha256({"tensors": state_dict_sha256({"images": images, "labels": labels}),
                        "ids": ids, "skipped": skipped}, default=None)


def _read_cache(path: Path, *, resolution: int | None = None, num_classes: int | None = None
                ) -> tuple[Tensor, Tensor, list[str], list[str]] | None:
    """The cached decode, or None (then the tree is decoded again) when the file is unreadable,
    of another format, or does not prove its content: no content hash, a hash that does not
    match (the file was modified), or tensors that cannot be this dataset's (wrong dtype or
    shape, labels out of range). Each refusal is ONE warning line naming the file."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            images, labels = f.get_tensor("images"), f.get_tensor("labels")
        ids, skipped = json.loads(meta["sample_ids"]), json.loads(meta["skipped"])
        if meta.get("format") != CACHE_FORMAT:
            return None
    except Exception as exc:  # noqa: BLE001 - a broken cache file is re-decoded, not fatal
        log.warning("ignoring unreadable decoded cache %s (%s); decoding again", path,
                    str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        return None
    problem = None
    if not isinstance(ids, list) or not isinstance(skipped, list):
        problem = "its sample ids are not a list"
    elif meta.get("content_sha256") is None:
        problem = "it carries no content hash (written by an older version)"
    elif cache_content_sha256(images, labels, ids, skipped) != meta["content_sha256"]:
        problem = "it does not match its content hash (modified on disk)"
    elif (images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3
          or (resolution is not None and tuple(images.shape[2:]) != (resolution, resolution))):
        problem = f"its images have dtype {images.dtype} and shape {tuple(images.shape)}"
    elif labels.dtype != torch.int64 or tuple(labels.shape) != (len(ids),) or len(ids) != len(
            images):
        problem = (f"its {len(images)} images, {tuple(labels.shape)} {labels.dtype} labels and "
                   f"{len(ids)} ids do not match")
    elif len(labels) and (int(labels.min()) < 0 or (
            num_classes is not None and int(labels.max()) >= num_classes)):
        problem = f"its labels are outside 0..{(num_classes or 1) - 1}"
    if problem:
        log.warning("decoded cache %s cannot be trusted: %s; decoding the images again", path,
                    problem)
        return None
    return images, labels, ids, skipped


def _write_cache(path: Path, images: Tensor, labels: Tensor, ids: list[str],
                 skipped: list[str]) -> None:
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        images, labels = images.contiguous(), labels.contiguous()
        save_file({"images": images, "labels": labels}, str(tmp),
                  metadata={"format": CACHE_FORMAT, "sample_ids": json.dumps(ids),
                            "skipped": json.dumps(skipped),
                            "content_sha256": cache_content_sha256(images, labels, ids,
                                                                   skipped)})
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError as exc:
        log.warning("could not write the decoded cache %s (%s); continuing without it", path, exc)


# ----------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------
@dataclass
class LoadRequest:
    """The options of one ``load_split`` call, resolved."""

    split: str
    roots: list[Path]
    explicit_root: bool
    resolution: int
    cache_root: Path
    progress: bool
    on_bad_image: str
    download: bool
    num_workers: int | None


class ImageDataset:
    """A registered dataset: its metadata plus the sources it can be loaded from.

    Subclasses set the class attributes and implement the ``_load_<source>`` methods they
    support; ``source_order`` lists what ``source="auto"`` tries, per data root.
    """

    name: ClassVar[str]
    title: ClassVar[str]                      # in messages: "CIFAR-10"
    classes: ClassVar[list[str]]              # human-readable, in label order
    folder_names: ClassVar[list[str]]         # class folder names in a tree, in label order
    default_resolution: ClassVar[int]
    native_size: ClassVar[int | None] = None  # tree images must have this size (None: any)
    default_eps: ClassVar[dict[str, float]]
    tree_dirname: ClassVar[str | None] = None  # "<root>/<tree_dirname>/<split dir>/<class>/"
    split_dirs: ClassVar[dict[str, str]] = {"train": "train", "test": "test"}
    source_order: ClassVar[tuple[str, ...]] = ("jpeg-tree", "torchvision")

    def __init__(self, resolution: int | None = None) -> None:
        self.resolution = int(resolution or self.default_resolution)
        if self.resolution < 1:
            raise DataError(f"{self.name}: resolution must be a positive int, got {resolution}")

    def info(self) -> DatasetInfo:
        return DatasetInfo(self.name, len(self.classes), list(self.classes), self.resolution,
                           dict(self.default_eps))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resolution={self.resolution})"

    # -- loading -------------------------------------------------------------------------
    def load(self, req: LoadRequest, source: str) -> LabeledImages:
        if source == "auto":
            return self._load_auto(req)
        if source not in self.sources():
            raise DataError(f"{self.name} has no source {source!r}; choose one of "
                            f"{', '.join(('auto',) + self.sources())}")
        result = getattr(self, "_load_" + _ident(source))(req, req.roots,
                                                          allow_download=req.download)
        if result is None:
            raise self._not_found(req, source)
        return result

    def sources(self) -> tuple[str, ...]:
        return tuple(s for s in SOURCES[1:] if hasattr(self, "_load_" + _ident(s)))

    def _load_auto(self, req: LoadRequest) -> LabeledImages:
        for root in req.roots:
            for source in self.source_order:
                result = getattr(self, "_load_" + _ident(source))(req, [root], allow_download=False)
                if result is not None:
                    return result
        if req.download and "torchvision" in self.source_order:
            return self._load_torchvision(req, req.roots, allow_download=True)
        raise self._not_found(req, "auto")

    def _not_found(self, req: LoadRequest, source: str) -> DataError:
        where = ", ".join(str(r) for r in req.roots)
        what = f"no {self.title} {req.split} split" + (f" (source {source!r})"
                                                         if source != "auto" else "")
        fix = "pass --data-root PATH or set ROBUSTMATRIX_DATA"
        if "torchvision" in self.source_order:
            fix += ", or allow download (download=True)"
        return DataError(f"{what} found under [{where}]; {fix}")

    def split_dir_name(self, split: str) -> str:
        return self.split_dirs[split]

    def find_tree(self, roots: Sequence[Path], split: str, explicit_root: bool) -> Path | None:
        """The split folder of a class-folder tree under one of ``roots``, or None."""
        sub = self.split_dir_name(split)
        for root in roots:
            candidates = []
            if self.tree_dirname:
                candidates.append(root / self.tree_dirname / sub)
            if explicit_root:  # an ImageFolder-style root given directly
                candidates += [root / sub, root]
            for c in candidates:
                if c.is_dir() and any((c / f).is_dir() for f in self.folder_names):
                    return c
        return None

    def _load_jpeg_tree(self, req: LoadRequest, roots: Sequence[Path],
                        allow_download: bool = False) -> LabeledImages | None:
        split_dir = self.find_tree(roots, req.split, req.explicit_root)
        if split_dir is None:
            return None
        return self.load_tree(split_dir, req, source="jpeg-tree")

    def load_tree(self, split_dir: Path, req: LoadRequest, *, source: str) -> LabeledImages:
        """Decode (or read from the cache) a class-folder split folder."""
        listing = list_tree(split_dir, self.folder_names, req.on_bad_image)
        cache = _cache_file(req.cache_root, self.name, source, req.split, req.resolution,
                            listing.signature())
        cached = _read_cache(cache, resolution=req.resolution, num_classes=len(self.classes))
        if cached is not None:
            images, labels, ids, skipped = cached
            log.debug("read %d decoded images from %s", len(ids), cache)
        else:
            images, kept, skipped = decode_files(
                listing.files, req.resolution, native_size=self.native_size,
                on_bad_image=req.on_bad_image, progress=req.progress,
                desc=f"decoding {self.name} {req.split}", num_workers=req.num_workers,
                display_root=split_dir)
            labels = torch.tensor([listing.labels[i] for i in kept], dtype=torch.int64)
            ids = [self.sample_id(req.split, listing.labels[i], listing.stems[i]) for i in kept]
            _write_cache(cache, images, labels, ids, skipped)
        if skipped:
            if req.on_bad_image == "error":
                raise DataError(f"bad image {os.path.join(split_dir, skipped[0])}; fix or remove "
                                f"it, or pass on_bad_image='skip'")
            warnings.warn(f"{self.name} {req.split}: skipped {len(skipped)} bad image(s), "
                          f"first: {skipped[0]}", stacklevel=4)
        return self.make(images, labels, ids, source, req.split, skipped=len(skipped))

    def sample_id(self, split: str, label: int, stem: str) -> str:
        return f"{self.name}/{split}/{label}/{stem}"

    def make(self, images_u8: Tensor, labels: Tensor, ids: list[str], source: str, split: str,
             *, skipped: int = 0) -> LabeledImages:
        images = images_u8.to(torch.float32).div_(255.0)
        return LabeledImages(images, labels.to(torch.int64), list(ids), list(self.classes),
                             self.name, source, split=split, skipped=skipped)


def _ident(source: str) -> str:
    return source.replace("-", "_")


# ----------------------------------------------------------------------------------------------
# the interface
# ----------------------------------------------------------------------------------------------
def get_dataset(dataset: str | ImageDataset, **kwargs: Any) -> ImageDataset:
    """A registered dataset by name (``DATASETS.create``), or an instance passed through."""
    if isinstance(dataset, ImageDataset):
        return dataset
    return DATASETS.create(dataset, **kwargs)


def dataset_info(dataset: str | ImageDataset, *, resolution: int | None = None) -> DatasetInfo:
    """Name, classes, image size and default epsilons, without loading any image."""
    ds = get_dataset(dataset)
    if resolution is not None:
        ds = type(ds)(resolution=resolution)
    return ds.info()


def _normalise_split(split: str) -> str:
    s = str(split).lower()
    if s in ("test", "val", "validation"):
        return "test"
    if s == "train":
        return "train"
    raise DataError(f"unknown split {split!r}; use 'train' or 'test'")


def load_split(dataset: str | ImageDataset, split: str = "test", *,
               root: str | os.PathLike | None = None, source: str = "auto",
               resolution: int | None = None, cache_dir: str | os.PathLike | None = None,
               progress: bool = False, on_bad_image: str = "error",
               download: bool | None = None, num_workers: int | None = None) -> LabeledImages:
    """The whole ``split`` of ``dataset``, in class-major order, decoded once and cached.

    ``source="auto"`` tries, for each data root in turn (``root``, else
    :func:`bench.core.paths.data_roots`), a class-folder tree then already-downloaded torchvision
    files, and finally a torchvision download into ``<cache>/data`` (``download``; by default
    only when no ``root`` was given). ``"lossless-csv"`` (CIFAR-10 test, 100 images) is only
    used when asked for. ``on_bad_image="skip"`` leaves out corrupt or wrongly sized images
    and counts them in ``.skipped``; ``"error"`` (the default) raises naming the file.
    """
    ds = get_dataset(dataset)
    split = _normalise_split(split)
    if source not in SOURCES:
        raise DataError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise DataError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    res = int(resolution) if resolution is not None else ds.resolution
    if res < 1:
        raise DataError(f"resolution must be a positive int, got {resolution!r}")
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else paths.cache_dir()
    if root is not None:
        roots, explicit = [Path(root).expanduser()], True
    else:
        roots, explicit = paths.data_roots(), False
        if cache_root / "data" not in roots:
            roots.append(cache_root / "data")
    req = LoadRequest(split, roots, explicit, res, cache_root, progress, on_bad_image,
                      download if download is not None else root is None, num_workers)
    return ds.load(req, source)


def balanced_indices(labels: Tensor, n: int, num_classes: int, seed: int) -> Tensor:
    """``n`` indices, as balanced over classes as the split allows: ``n // num_classes`` per
    class with the remainder going to the first classes; a class with too few images gives
    its shortfall to the next classes in order (water-filling; e.g. the unbalanced 100-image
    lossless CSV with n = 100 yields all of it). Drawn without replacement with
    ``numpy.random.default_rng(seed)``; sorted."""
    lab = labels.numpy()
    avail = np.bincount(lab, minlength=num_classes)[:num_classes]
    if n > int(avail.sum()):
        raise DataError(f"asked for {n} images but the split has only {int(avail.sum())}")
    counts = np.zeros(num_classes, dtype=np.int64)
    remaining = n
    while remaining > 0:
        open_classes = [c for c in range(num_classes) if counts[c] < avail[c]]
        share = max(1, remaining // len(open_classes))
        for c in open_classes:
            give = min(share, int(avail[c] - counts[c]), remaining)
            counts[c] += give
            remaining -= give
            if remaining == 0:
                break
    rng = np.random.default_rng(seed)
    chosen = []
    for c, k in enumerate(counts):
        pool = np.flatnonzero(lab == c)
        if k:
            chosen.append(pool[np.sort(rng.choice(len(pool), size=int(k), replace=False))])
    idx = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(idx.astype(np.int64))


def load_eval(dataset: str | ImageDataset, n: int, *, seed: int = 0, split: str = "test",
              **kw: Any) -> LabeledImages:
    """``n`` evaluation examples, balanced per class (``n // classes`` each, the remainder to
    the first classes), drawn with ``seed``, in split (class-major) order."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n <= 0:
        raise DataError(f"the number of evaluation images must be a positive int, got {n!r}")
    data = load_split(dataset, split, **kw)
    if n > len(data):
        raise DataError(f"asked for {n} images but the {data.dataset} {data.split} split "
                        f"({data.source}) has only {len(data)}")
    return data.subset(balanced_indices(data.labels, int(n), len(data.classes), seed))


def load_train(dataset: str | ImageDataset, *, limit: int | None = None, seed: int = 0,
               **kw: Any) -> LabeledImages:
    """The train split, or a seeded class-balanced subsample of at most ``limit`` images."""
    kw.pop("split", None)
    data = load_split(dataset, "train", **kw)
    if limit is None or limit >= len(data):
        return data
    if limit <= 0:
        raise DataError(f"limit must be a positive int or None, got {limit!r}")
    return data.subset(balanced_indices(data.labels, int(limit), len(data.classes), seed))

