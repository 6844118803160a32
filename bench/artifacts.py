"""Building defenses, and fitting or reloading their trained parts (content-addressed).

A trainable defense's artifact is its ``state_dict`` saved as safetensors, with metadata
(defense name, dataset, resolution, preset, ``config()``, training-data fingerprint). Its key is
the sha256 of that metadata, so a changed input trains a new artifact, and an artifact given
explicitly for another dataset, resolution or configuration is REFUSED with a clear error.
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.core import paths
from bench.core.hashing import file_sha256, json_sha256, state_dict_sha256
from bench.core.registry import DEFENSES


class ArtifactError(ValueError):
    """An artifact that does not match what it is used for (one-line message with the fix)."""


def _accepts(factory: Any, name: str) -> bool:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return True
    return name in sig.parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def construct_defense(name: str, options: dict[str, Any], *, dataset: str,
                      dataset_options: dict[str, Any] | None = None, device: str = "cpu",
                      preset: str = "quick", progress: bool = False):
    """Instantiate a registered defense, passing the harness's context where it is accepted."""
    factory = DEFENSES.get(name)
    context = {"dataset": dataset, "device": device, "preset": preset, "progress": progress}
    res = (dataset_options or {}).get("resolution")
    if res is not None:
        context["resolution"] = res
    kwargs = {k: v for k, v in context.items() if _accepts(factory, k) and k not in options}
    return DEFENSES.create(name, **kwargs, **options)


def artifact_metadata(defense: Any, name: str, *, dataset: str, resolution: Any, preset: str,
                      train_fingerprint: str) -> dict[str, str]:
    return {"defense": name, "dataset": dataset, "resolution": str(resolution), "preset": preset,
            "config": json.dumps(defense.config(), sort_keys=True, default=str),
            "train_fingerprint": train_fingerprint, "format": "robustmatrix-artifact-1"}


def artifact_key(meta: dict[str, str]) -> str:
    return json_sha256(meta, default=None)


#: the metadata field holding an artifact's content hash (checked on every load)
CONTENT_FIELD = "content_sha256"
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
              torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def content_sha256(state: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """An artifact's identity: its tensors (names, dtypes, shapes, bytes, in name order;
    :func:`state_dict_sha256`) and its metadata (sorted keys; the content field itself left
    out). Identical fits give identical hashes on every machine."""
    return json_sha256({"tensors": state_dict_sha256(state),
                        "meta": {k: v for k, v in meta.items() if k != CONTENT_FIELD}},
                       default=None)


def canonical_safetensors(state: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """A safetensors file with a canonical layout: tensors in name order, the JSON header with
    sorted keys and no spaces (``safetensors.torch.save_file`` writes the metadata in hash-map
    order, so two bit-identical fits gave two file sha256s)."""
    import struct

    header: dict[str, Any] = {}
    blobs, offset = [], 0
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        if t.dtype not in _ST_DTYPES:
            raise ArtifactError(f"tensor {name} has dtype {t.dtype}, which an artifact cannot "
                                "hold; keep the defense's state in float/int tensors")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {str(k): str(v) for k, v in sorted(meta.items())}
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def save_artifact(defense: Any, path: Path, meta: dict[str, str]) -> str:
    """Write ``defense.state_dict()`` with ``meta`` and its content hash (canonical layout,
    atomically); returns the file's sha256."""
    state = {k: v.detach().cpu().contiguous() for k, v in defense.state_dict().items()}
    return write_artifact(state, Path(path), meta)


def write_artifact(state: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> str:
    meta = {k: v for k, v in meta.items() if k != CONTENT_FIELD}
    meta[CONTENT_FIELD] = content_sha256(state, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(canonical_safetensors(state, meta))
    tmp.replace(path)
    return file_sha256(path)


class ArtifactDamaged(ArtifactError):
    """An artifact whose tensors or metadata no longer match its recorded content hash."""


def load_artifact(defense: Any, path: Path, expected: dict[str, str] | None = None,
                  device: str = "cpu", *, log=None) -> dict[str, str]:
    """Load an artifact into ``defense`` after checking it: its metadata against ``expected``
    and its tensors + metadata against the content hash it carries (:class:`ArtifactDamaged` on
    a mismatch). An artifact written before content hashes carries none: with ``log`` given (the
    harness's own cache) the hash is recorded now, once, with one line saying so."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"no artifact at {path}; run `robustmatrix fit` first")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise ArtifactError(f"{path} is not a robustmatrix artifact (safetensors) ({exc}); "
                            "delete it and run `robustmatrix fit` again") from None
    if expected is not None:
        for field in ("defense", "dataset", "resolution", "config"):
            if meta.get(field) != expected.get(field):
                raise ArtifactError(
                    f"artifact {path.name} was trained for {field}={meta.get(field)!r}, not "
                    f"{expected.get(field)!r}; fit the defense for this setting "
                    f"(`robustmatrix fit {expected.get('defense')} --dataset "
                    f"{expected.get('dataset')}`) instead of reusing it")
    try:
        state = load_file(str(path), device=str(device))
    except Exception as exc:  # noqa: BLE001 - a truncated or garbled tensor section
        raise ArtifactDamaged(f"artifact {path} cannot be read ({str(exc)[:200]}); delete it and "
                              "run `robustmatrix fit` again") from None
    recorded = meta.get(CONTENT_FIELD)
    if recorded is not None:
        if content_sha256(state, meta) != recorded:
            raise ArtifactDamaged(f"artifact {path} does not match its content hash (its tensors "
                                  "or metadata were modified on disk); delete it and run "
                                  "`robustmatrix fit` again")
    elif log is not None:  # written before content hashes: record one (trust on first use)
        write_artifact({k: v.cpu() for k, v in state.items()}, path, meta)
        log(f"artifact {path.name} was written before artifacts carried a content hash; "
            "recorded one now (later loads check it)")
    try:
        defense.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # missing/unexpected keys or shapes: another model's tensors
        first = " ".join(s.strip() for s in str(exc).strip().splitlines()[:2])[:300]
        raise ArtifactError(f"artifact {path} does not fit this defense ({first}); delete it "
                            "and run `robustmatrix fit` again") from None
    defense.fitted = True
    return meta


# ------------------------------------------------------------------------ shipped artifacts
#: folder of the trained artifacts that come with the project (``standard`` scale)
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "defenses" / "weights"


@dataclass(frozen=True)
class Shipped:
    """A trained artifact committed to the repository, pinned by the sha256 of its file."""

    filename: str
    sha256: str

    @property
    def path(self) -> Path:
        return SHIPPED_DIR / self.filename


#: (defense, dataset, resolution, preset) -> the shipped artifact; each has a model card
#: (``<file>.md``: recipe, data, wall time, measured accuracy, code version, sha256)
SHIPPED: dict[tuple[str, str, int | None, str], Shipped] = {
    ("spat", "cifar10", None, "standard"): Shipped(
        "spat-cifar10-standard.safetensors",
        "1c3ecdf9fe898d171d17e47fa17e8c7f683da16e4dacdfa17154e9448b8120c0"),
    ("spat", "imagenet10", 64, "standard"): Shipped(
        "spat-imagenet10-64px-standard.safetensors",
        "80b10065f900291c92b4c24ebf4a6ddd6cd9a7f0df01d41e088991e4054c7a8c"),
    ("pgd_at", "cifar10", None, "standard"): Shipped(
        "pgd_at-cifar10-standard.safetensors",
        "8f2a03975fe3ea77591ad7d8135445885efc186d9dc81ab2983a5fe8a92bfd7c"),
    ("pgd_at", "imagenet10", 64, "standard"): Shipped(
        "pgd_at-imagenet10-64px-standard.safetensors",
        "709edddc06ac07bbb4169ca15cfb306972bf3a35a4f0c28fb1f772359e1d8f75"),
    ("semantic_ae", "cifar10", None, "standard"): Shipped(
        "semantic_ae-cifar10-standard.safetensors",
        "ba57d9a6416872fab580ea23bfbe79f4fd79ea99b71b904b6bbd215accff1db5"),
    ("aae_detector", "cifar10", None, "standard"): Shipped(
        "aae_detector-cifar10-standard.safetensors",
        "a1c26288cee5e9dc6d79425099decc5719a89b6491e8b89d4a6afa97d13d6281"),
    ("plain_ae", "cifar10", None, "standard"): Shipped(
        "plain_ae-cifar10-standard.safetensors",
        "a947a6e50ae49c1674171183a3cd56f6e16551fcec766a90d435a4689f583328"),
    ("semantic_ae", "imagenet10", 64, "standard"): Shipped(
        "semantic_ae-imagenet10-64px-standard.safetensors",
        "86e4ee086e10607aa40fc236e58533c4b1935ed26d6a669dd4fbf170ff8fb4db"),
    ("plain_ae", "imagenet10", 64, "standard"): Shipped(
        "plain_ae-imagenet10-64px-standard.safetensors",
        "778b5261dafa5e1fe57b377e58f29a47de9ab8e69fcda2675d6d60ada674c6c9"),
    ("aae_detector", "imagenet10", 64, "standard"): Shipped(
        "aae_detector-imagenet10-64px-standard.safetensors",
        "7b942484fb4c15f1f250431ea0a2b7591ffe48a6215ee60d2fe75990c6815ae0"),
    ("srd", "cifar10", None, "standard"): Shipped(
        "srd-cifar10-standard.safetensors",
        "c3ea403d3e2768f58ab0983a07c2fe7dd43ada1899bb2cd7aa3ed1fb9c58b9a4"),
    ("srd", "imagenet10", 64, "standard"): Shipped(
        "srd-imagenet10-64px-standard.safetensors",
        "96d046d6ba4a5d709c721b6580865a730a2e88623f99d50a1a2dc0859236cf10"),
    # the quick-scale SRD (issue 14 ships the standard one): `robustmatrix run defenses` on a
    # fresh clone fits nothing
    ("srd", "cifar10", None, "quick"): Shipped(
        "srd-cifar10-quick.safetensors",
        "df7721d129f3fc2a7a6c6048d53434435f0a60f947fbd8bda5a014d2a71501fd"),
}


@dataclass(frozen=True)
class ShippedMatch:
    path: Path
    sha256: str
    expected: dict[str, str]


def verify_shipped(entry: Shipped) -> None:
    """Raise a one-line :class:`ArtifactError` (with the fix) when a shipped file does not match
    its pinned sha256."""
    from bench.models.checkpoint import ChecksumError, verify_sha256

    try:
        verify_sha256(entry.path, entry.sha256)
    except ChecksumError:
        raise ArtifactError(f"shipped artifact {entry.path.name} does not match its pinned "
                            f"sha256 {entry.sha256[:12]}...; restore it (`git checkout -- "
                            f"defenses/weights/{entry.path.name}`)") from None


def shipped_artifact(defense: Any, name: str, *, dataset: str, resolution: Any, preset: str,
                     log=print) -> ShippedMatch | None:
    """The shipped artifact for this defense, or None when there is none or the defense's
    options differ from those it was trained with (then the harness fits as usual). A file
    that does not match its pinned sha256 is refused with a one-line error."""
    entry = SHIPPED.get((name, dataset, resolution, preset))
    if entry is None:
        return None
    if not entry.path.is_file():
        raise ArtifactError(f"shipped artifact {entry.path} is missing; restore it "
                            f"(`git checkout -- {entry.path.name}`) or fit the defense "
                            f"(`robustmatrix fit {name} --preset {preset}`)")
    verify_shipped(entry)
    expected = {"defense": name, "dataset": dataset, "resolution": str(resolution),
                "config": json.dumps(defense.config(), sort_keys=True, default=str)}
    with _safe_open(entry.path) as f:
        meta = dict(f.metadata() or {})
    if meta.get("config") != expected["config"]:
        try:
            theirs = json.loads(meta.get("config", "{}"))
        except ValueError:
            theirs = {}
        ours = json.loads(expected["config"])
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        log(f"the shipped {name} artifact was trained with other options "
            f"({', '.join(diff) or 'config'} differ); fitting instead")
        return None
    return ShippedMatch(entry.path, entry.sha256, expected)


def _safe_open(path: Path):
    from safetensors import safe_open

    return safe_open(str(path), framework="pt")


def prepare_defense(name: str, options: dict[str, Any], *, dataset: str,
                    dataset_options: dict[str, Any] | None = None, device: str = "cpu",
                    preset: str = "quick", progress: bool = False, artifact: str | None = None,
                    allow_fit: bool = True, log=print):
    """Construct a defense and make it usable: load its artifact, or fit and save one.

    Returns ``(defense, info)`` where ``info`` holds the artifact path, sha256 and fit time.
    """
    dataset_options = dict(dataset_options or {})
    options = dict(options)
    artifact = artifact or options.pop("artifact", None)
    preset = str(options.pop("preset", preset))  # a defense entry may pick its own fit scale
    defense = construct_defense(name, options, dataset=dataset, dataset_options=dataset_options,
                                device=device, preset=preset, progress=progress)
    defense.to(device)
    info: dict[str, Any] = {"artifact": None, "artifact_sha256": None, "fit_seconds": 0.0,
                            "shipped": False, "preset": preset}
    if not getattr(defense, "trainable", False):
        defense.eval()
        return defense, info
    resolution = dataset_options.get("resolution")
    if not artifact:
        shipped = shipped_artifact(defense, name, dataset=dataset, resolution=resolution,
                                   preset=preset, log=log)
        if shipped is not None:  # a trained artifact that comes with the project: fit nothing
            load_artifact(defense, shipped.path, shipped.expected, device=device)
            info.update(artifact=str(shipped.path), artifact_sha256=shipped.sha256, shipped=True)
            defense.eval()
            return defense, info
    from bench.data import load_train

    load_kw = {k: v for k, v in dataset_options.items() if k in ("root", "source", "resolution")}
    if artifact:
        meta_expected = {"defense": name, "dataset": dataset, "resolution": str(resolution),
                         "config": json.dumps(defense.config(), sort_keys=True, default=str)}
        load_artifact(defense, Path(artifact), meta_expected, device=device)
        info.update(artifact=str(artifact),
                    artifact_sha256=file_sha256(Path(artifact)))
        defense.eval()
        return defense, info
    train = load_train(dataset, **load_kw)
    meta = artifact_metadata(defense, name, dataset=dataset, resolution=resolution, preset=preset,
                             train_fingerprint=train.fingerprint)
    path = paths.cache_dir() / "artifacts" / name / f"{artifact_key(meta)}.safetensors"
    if path.exists():
        try:
            load_artifact(defense, path, meta, device=device, log=log)
        except ArtifactDamaged as exc:  # a cache that lies is refitted, never used
            log(f"{exc}: refitting")
            path.unlink(missing_ok=True)
    if not path.exists():
        if not allow_fit:
            raise ArtifactError(f"defense '{name}' is not fitted for {dataset}; run "
                                f"`robustmatrix fit {name} --dataset {dataset}` first")
        fit_kw: dict[str, Any] = {}
        resume = path.with_name(path.stem + ".resume.pt")
        if _accepts(defense.fit, "checkpoint"):
            fit_kw["checkpoint"] = resume
            if resume.exists():
                log(f"resuming the fit of {name} from {resume}")
        log(f"fitting {name} on {dataset} ({preset} preset); the artifact is cached for reuse")
        t0 = time.perf_counter()
        defense.train()
        defense.fit(train, preset=preset, device=device, progress=progress, **fit_kw)
        defense.fitted = True
        info["fit_seconds"] = time.perf_counter() - t0
        save_artifact(defense, path, meta)
        fit_info = getattr(defense, "fit_info", None)
        if fit_info:  # wall time, history, ...: beside the artifact (not in it: same weights,
            # same file)
            from bench.model_card import code_version

            fit_info = {**fit_info, "code_version": code_version()}
            path.with_name(path.stem + ".fit.json").write_text(
                json.dumps(fit_info, indent=1, sort_keys=True, default=str))
        resume.unlink(missing_ok=True)
    info.update(artifact=str(path), artifact_sha256=file_sha256(path))
    defense.eval()
    return defense, info


def resolve_device(device: str) -> str:
    """``auto`` -> cuda or cpu; a device this machine does not have is a one-line error."""
    import re

    from bench.core.config import ConfigError

    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?|mps", device):
        raise ConfigError(f"device: expected auto, cpu, cuda, cuda:N or mps, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available on this "
                          "machine; use --device cpu or auto")
    if device.startswith("cuda:") and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA "
                          "device(s); use --device cuda:0 or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None)
                                and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' requested but MPS is not available; use --device cpu "
                          "or auto")
    return device
