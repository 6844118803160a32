"""Loading a submission: user code from a file, a module or a registry name, registered under a
content-addressed name; and rebuilding the defense of an existing leaderboard entry.

:func:`load_submission` imports the defense from ``path/to/file.py:ClassName`` (any folder,
inside the repository or not), a ``module:attr`` string, or a registry / entry-point name;
:func:`register_submission` registers it in ``DEFENSES`` under ``<label>@<sha256 of the file, 8
hex>``, so a changed file is a different defense. :func:`snapshot` copies the source into the
run directory; :func:`register_from_entry` / :func:`build_entry_defense` rebuild an entry's
defense (from the current file or the snapshot) for ``verify`` and ``sweep``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import shutil
import sys
from pathlib import Path
from typing import Any

from bench.core.hashing import file_sha256
from bench.core.registry import DEFENSES, RegistryError

SUBMISSION_ATTR = "__robustmatrix_submission__"


class SubmitError(ValueError):
    """A submission that cannot be loaded or run (one-line message naming the fix)."""


# 1. loading ----------------------------------------------------------------------------------
def _file_sha256(path: Path) -> str:
    return file_sha256(path)


def _import_file(path: Path) -> Any:
    """Import a Python file by path under a name derived from its content (a second import of
    the same content returns the same module, so the same class object)."""
    sha = _file_sha256(path)
    modname = f"robustmatrix_submission_{slug(path.stem)}_{sha[:12]}"
    if modname in sys.modules:
        return sys.modules[modname]
    folder = str(path.parent.resolve())
    if folder not in sys.path:
        sys.path.append(folder)  # the user's helper modules next to the file (never shadowing)
    spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise SubmitError(f"cannot import {path} as a Python module; give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[modname]
        raise SubmitError(f"importing {path} failed with {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}; run "
                          f"`python {path}` to see the full error") from exc
    return module


def slug(text: str) -> str:
    from leaderboard.entries import slug as _slug

    return _slug(text)


def _candidates(module: Any) -> list[str]:
    from torch import nn

    return [n for n, o in vars(module).items() if inspect.isclass(o) and issubclass(o, nn.Module)
            and o.__module__ == module.__name__ and not n.startswith("_")]


def _pick_class(module: Any, name: str | None, where: str) -> Any:
    from defenses.base import Defense

    if name:
        obj = getattr(module, name, None)
        if obj is None:
            cands = _candidates(module)
            close = difflib.get_close_matches(name, cands, n=1)
            hint = f"did you mean '{close[0]}'?" if close else (
                f"it defines: {', '.join(cands)}" if cands else "it defines no nn.Module class")
            raise SubmitError(f"{where} has no class '{name}'; {hint}")
        return obj
    defenses = [n for n in _candidates(module) if issubclass(getattr(module, n), Defense)]
    if len(defenses) == 1:
        return getattr(module, defenses[0])
    raise SubmitError(f"{where}: name the class to submit as {where}:ClassName "
                      f"(candidates: {', '.join(_candidates(module)) or 'none'})")


def load_submission(spec: str) -> tuple[Any, dict[str, Any]]:
    """The class or factory named by ``spec`` and a ``source`` record for provenance.

    ``spec`` is ``path/to/file.py[:ClassName]``, ``package.module:attr`` (an importable
    object, e.g. what an entry point names), or a registry name (built-in, or installed through
    the ``robustmatrix.defenses`` entry-point group).
    """
    head, sep, tail = spec.rpartition(":")
    if sep and head.endswith(".py") or spec.endswith(".py"):
        path = Path(head if sep and head.endswith(".py") else spec).expanduser()
        attr = tail if sep and head.endswith(".py") else ""
        if not path.is_file():
            raise SubmitError(f"no file {path}; give path/to/file.py:ClassName")
        module = _import_file(path)
        obj = _pick_class(module, attr or None, str(path))
        return obj, {"kind": "file", "spec": spec, "path": str(path.resolve()),
                     "class": obj.__name__, "sha256": _file_sha256(path)}
    if sep:
        try:
            module = importlib.import_module(head)
        except ImportError as exc:
            raise SubmitError(f"cannot import module '{head}' ({exc}); install the package "
                              "that provides it or give path/to/file.py:ClassName") from None
        obj = _pick_class(module, tail, head)
        file = getattr(module, "__file__", None)
        return obj, {"kind": "module", "spec": spec, "path": file, "class": tail,
                     "sha256": _file_sha256(Path(file)) if file else None}
    try:
        obj = DEFENSES.get(spec)
    except RegistryError as exc:
        raise SubmitError(f"{exc}; or give path/to/file.py:ClassName") from None
    file = inspect.getsourcefile(obj) if (inspect.isclass(obj) or inspect.isfunction(obj)) else None
    return obj, {"kind": "registry", "spec": spec, "name": spec, "path": file,
                 "class": getattr(obj, "__name__", spec),
                 "sha256": _file_sha256(Path(file)) if file else None}


class SubmittedModel:
    """Factory wrapping a plain ``nn.Module`` classifier into a :class:`Defense` (no declared
    preprocessor or detector; ``random`` read from the class attribute if present)."""

    def __init__(self, cls: Any) -> None:
        self.cls = cls
        self.__name__ = cls.__name__
        self.__doc__ = cls.__doc__

    def __call__(self, **kwargs: Any):
        from bench.artifacts import _accepts
        from bench.data import dataset_info
        from defenses.base import Defense

        model = self.cls(**{k: v for k, v in kwargs.items() if _accepts(self.cls, k)})
        num_classes = getattr(model, "num_classes", None)
        if num_classes is None and "dataset" in kwargs:
            num_classes = dataset_info(kwargs["dataset"]).num_classes
        wrapped = Defense(model, num_classes=num_classes)
        wrapped.random = bool(getattr(model, "random", False))
        return wrapped


def register_submission(obj: Any, source: dict[str, Any], label: str) -> str:
    """Register ``obj`` in ``DEFENSES``; returns the registry name used in the config."""
    from torch import nn

    from defenses.base import Defense

    if source["kind"] == "registry":
        return source["name"]
    name = f"{slug(label)}@{(source.get('sha256') or '0' * 8)[:8]}"
    if name in DEFENSES:
        existing = DEFENSES.get(name)
        if getattr(existing, SUBMISSION_ATTR, None) == source.get("sha256"):
            return name
        raise SubmitError(f"the name '{slug(label)}' is taken by another defense; choose another "
                          "--name")
    if inspect.isclass(obj) and issubclass(obj, nn.Module) and not issubclass(obj, Defense):
        factory: Any = SubmittedModel(obj)
    elif callable(obj):
        factory = obj
    else:
        raise SubmitError(f"{source['spec']} is a {type(obj).__name__}, not a class or factory; "
                          "name a Defense (or nn.Module) subclass")
    DEFENSES.register(name, factory)
    try:
        setattr(factory, SUBMISSION_ATTR, source.get("sha256"))
    except (AttributeError, TypeError):
        pass
    return name


def snapshot(path: Path | None, folder: Path) -> str | None:
    """Copy ``path`` into ``folder`` under its sha256; returns the copy's path."""
    if not path or not Path(path).is_file():
        return None
    sha = _file_sha256(Path(path))
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{sha[:16]}{''.join(Path(path).suffixes[-1:])}"
    if not dest.exists():
        shutil.copyfile(path, dest)
    return str(dest)


# rebuilding a submitted defense from its entry (verify, sweep) -------------------------------
def resolve_run_dir(entry: dict[str, Any]) -> Path:
    from leaderboard.entries import EntryError

    prov = entry["provenance"]
    cands = []
    if entry.get("_path") and prov.get("run_dir_relative"):
        cands.append(Path(entry["_path"]).parent / prov["run_dir_relative"])
    if prov.get("run_dir"):
        cands.append(Path(prov["run_dir"]))
    for c in cands:
        if (c / "results.sqlite").exists():
            return c.resolve()
    raise EntryError(f"the run directory of entry {entry['entry_id']!r} is gone (looked in "
                     f"{', '.join(map(str, cands))}); keep the run folder next to its entries")


def register_from_entry(entry: dict[str, Any], *, use_snapshot: bool = False) -> tuple[str, dict]:
    """Register the entry's defense again, importing ONLY code whose sha256 is the one the
    entry records: the current source file when it is unchanged, else the snapshot taken at
    submission (``notes["source_changed"]``). The sha256 is checked BEFORE anything is
    imported, so an edited entry (its source path pointed at other code) or an edited file runs
    nothing; with neither an intact file nor an intact snapshot it is an :class:`EntryError`.
    Returns the registry name and notes on what was used."""
    from leaderboard.entries import EntryError

    src = dict(entry["defense"]["source"])
    notes: dict[str, Any] = {"source_changed": False}
    if src["kind"] == "registry":
        return src["name"], notes
    recorded = src.get("sha256")
    path = Path(src.get("path") or "")
    snap = resolve_run_dir(entry) / src["snapshot"] if src.get("snapshot") else None
    current = _file_sha256(path) if path.is_file() else None
    notes["source_sha256"] = current
    notes["source_changed"] = recorded is not None and current != recorded
    if not use_snapshot and current is not None and (recorded is None or current == recorded):
        chosen = path  # the submitted file, unchanged
    else:
        snap_sha = _file_sha256(snap) if snap is not None and snap.is_file() else None
        if snap_sha is None or (recorded is not None and snap_sha != recorded):
            what = ("is gone" if current is None else f"has sha256 {current[:12]}, the entry "
                    f"records {str(recorded)[:12]}")
            raise EntryError("nothing was imported: the snapshot taken at submission is "
                             + ("gone" if snap_sha is None else "modified") + f" and the source "
                             f"{path} {what}; restore the submitted file")
        notes["used_snapshot"] = True
        chosen = snap
    if src["kind"] == "file" or chosen != path:
        obj, new_src = load_submission(f"{chosen}:{src['class']}")
    else:
        obj, new_src = load_submission(src["spec"])
    return register_submission(obj, {**new_src, "sha256": recorded or new_src.get("sha256")},
                               entry["defense"]["label"]), notes


def build_entry_defense(entry: dict[str, Any], *, device: str = "cpu", log=print,
                        use_snapshot: bool = False):
    """The entry's defense rebuilt from its current source and loaded with its RECORDED weights
    (the artifact snapshot taken at submission) when it is trainable. Returns
    ``(defense, registry_name, notes)``; a changed architecture fails to load (stale entry)."""
    from bench.artifacts import construct_defense, load_artifact, prepare_defense

    name, notes = register_from_entry(entry, use_snapshot=use_snapshot)
    prov = entry["provenance"]
    options = dict(prov.get("defense_options") or {})
    ds_opts = prov.get("dataset_options") or {}
    preset = prov.get("fit_preset") or "quick"
    art = entry["defense"].get("artifact_snapshot")
    art = resolve_run_dir(entry) / art if art else None
    defense = construct_defense(name, options, dataset=entry["dataset"], dataset_options=ds_opts,
                                device=device, preset=preset, progress=False)
    if getattr(defense, "trainable", False) and art is not None and art.is_file():
        defense.to(device)
        load_artifact(defense, art, None, device=device)
        defense.eval()
    else:
        defense, _ = prepare_defense(name, options, dataset=entry["dataset"],
                                     dataset_options=ds_opts, device=device, preset=preset,
                                     progress=False, log=log)
    return defense, name, notes
