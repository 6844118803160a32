"""ImageNet-10: the ten Imagenette classes, from the local tree or torchvision's download."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from bench.core.registry import DATASETS
from bench.data.core import DataError, ImageDataset, LabeledImages, LoadRequest

#: (WNID, human-readable name) in label order (WNIDs sorted, as ImageFolder orders them)
IMAGENETTE_CLASSES = [
    ("n01440764", "tench"),
    ("n02102040", "English springer"),
    ("n02979186", "cassette player"),
    ("n03000684", "chain saw"),
    ("n03028079", "church"),
    ("n03394916", "French horn"),
    ("n03417042", "garbage truck"),
    ("n03425413", "gas pump"),
    ("n03445777", "golf ball"),
    ("n03888257", "parachute"),
]
#: torchvision's Imagenette extraction folders, in the order they are looked for
TORCHVISION_DIRS = ("imagenette2-320", "imagenette2", "imagenette2-160")
DOWNLOAD_SIZE = ("320px", "imagenette2-320")


@DATASETS.register("imagenet10")
class ImageNet10(ImageDataset):
    """The ten Imagenette classes at ``resolution`` x ``resolution`` (default 64, for CPU work;
    112 or 224 for ImageNet-style models): the shorter side is resized (bilinear, antialiased)
    and the centre cropped. The ``test`` split is Imagenette's official ``val`` split.

    Sources: ``"jpeg-tree"`` (``<root>/imagenette-224/{train,val}/<wnid>/*.JPEG``, or any
    ImageFolder-style root with WNID folders), ``"torchvision"`` (``torchvision.datasets.
    Imagenette``, 320px version, downloaded into ``<cache>/data``). Ids are
    ``imagenet10/<split>/<label>/<file stem>``.

    Default budgets: Linf 4/255 is RobustBench's ImageNet threat model. For L2 we use 1.0:
    the common ImageNet L2 budget is 3.0 at 224x224; at the default 64x64 (3.5x fewer pixels
    per side) an L2 ball of the same per-pixel RMS has radius 3.0 * 64 / 224 = 0.86, rounded
    up to 1.0. At other resolutions pass an explicit epsilon (it scales with the side).
    """

    name = "imagenet10"
    title = "ImageNet-10 (Imagenette)"
    classes = [c for _, c in IMAGENETTE_CLASSES]
    folder_names = [w for w, _ in IMAGENETTE_CLASSES]
    default_resolution = 64
    native_size = None
    default_eps = {"linf": 4 / 255, "l2": 1.0}
    tree_dirname = "imagenette-224"
    split_dirs = {"train": "train", "test": "val"}
    source_order = ("jpeg-tree", "torchvision")

    def _load_torchvision(self, req: LoadRequest, roots: Sequence[Path],
                          allow_download: bool = False) -> LabeledImages | None:
        sub = self.split_dir_name(req.split)
        for root in roots:
            for d in TORCHVISION_DIRS:
                if (root / d / sub).is_dir():
                    return self.load_tree(root / d / sub, req, source="torchvision")
        if not allow_download:
            return None
        from torchvision.datasets import Imagenette

        size, dirname = DOWNLOAD_SIZE
        target = req.cache_root / "data"
        try:
            Imagenette(str(target), split=sub, size=size, download=True)
        except Exception as exc:  # noqa: BLE001 - network or archive errors become one line
            raise DataError(f"could not download Imagenette with torchvision into {target} "
                            f"({type(exc).__name__}: {exc}); pass --data-root PATH or set "
                            f"ROBUSTMATRIX_DATA") from exc
        return self.load_tree(target / dirname / sub, req, source="torchvision")
