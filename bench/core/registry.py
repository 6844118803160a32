"""One generic registry, instantiated once per kind of component.

Modelled on lm-evaluation-harness's ``Registry`` and timm's ``create_model``/``list_models``:

* ``@DEFENSES.register("name")`` registers a class or factory; a duplicate name is an error.
* ``DEFENSES.register_lazy("name", "module:attr")`` registers an entry that is imported only
  when it is first created, so heavy optional dependencies cost nothing at start-up.
* ``create(name, **kwargs)`` builds a FRESH object each call; ``None`` kwargs are dropped so the
  component's own defaults win.
* ``list("pattern*")`` lists names (fnmatch); ``test_*`` entries are tiny components that live
  in the real registries so the test-suite can iterate over every entry.
* An unknown name raises :class:`RegistryError` with a "did you mean" suggestion.
* Installed packages add entries through the Python entry-point groups
  ``robustmatrix.defenses``, ``robustmatrix.attacks``, ``robustmatrix.datasets`` and
  ``robustmatrix.models``; each entry point names a class or factory.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from importlib import metadata
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError, ValueError):
    """An unknown, duplicate or broken registry entry. ``str()`` is a one-line message."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A name -> factory mapping for one kind of component (defense, attack, ...)."""

    def __init__(self, kind: str, *, entry_point_group: str | None = None,
                 builtin_modules: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._builtin_modules = builtin_modules
        self._entries: dict[str, Callable[..., T] | str] = {}
        self._loaded = False

    # registration -------------------------------------------------------------------------
    def register(self, name: str, obj: Callable[..., T] | None = None):
        """Register ``obj`` under ``name``; usable as a decorator."""

        def deco(o: Callable[..., T]) -> Callable[..., T]:
            self._add(name, o)
            try:
                o.registry_name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return o

        return deco(obj) if obj is not None else deco

    def register_lazy(self, name: str, target: str) -> None:
        """Register ``"module.path:attribute"``; imported on first ``create``."""
        if ":" not in target:
            raise RegistryError(f"lazy {self.kind} '{name}' must be 'module:attribute', "
                                f"got {target!r}")
        self._add(name, target)

    def _add(self, name: str, obj: Callable[..., T] | str) -> None:
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{self.kind} names must be non-empty strings, got {name!r}")
        if name in self._entries and self._entries[name] is not obj:
            raise RegistryError(f"duplicate {self.kind} name '{name}': pick another name")
        self._entries[name] = obj

    # discovery ----------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self._builtin_modules:
            importlib.import_module(module)
        if self.entry_point_group:
            for ep in metadata.entry_points(group=self.entry_point_group):
                if ep.name not in self._entries:
                    self._entries[ep.name] = (ep.value if ":" in ep.value
                                              else ep.value + ":" + ep.name)

    # lookup -------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def list(self, pattern: str = "*", *, include_test: bool = True) -> list[str]:
        """Sorted names matching an fnmatch ``pattern``."""
        self._ensure_loaded()
        names = sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))
        return names if include_test else [n for n in names if not n.startswith("test_")]

    def get(self, name: str) -> Callable[..., T]:
        """The registered class or factory (importing a lazy entry)."""
        self._ensure_loaded()
        if name not in self._entries:
            raise RegistryError(self._unknown_message(name))
        obj = self._entries[name]
        if isinstance(obj, str):
            module, _, attr = obj.partition(":")
            try:
                obj = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise RegistryError(
                    f"{self.kind} '{name}' points at {self._entries[name]!r}, which cannot be "
                    f"imported ({exc}); install the package that provides it") from exc
            self._entries[name] = obj
        return obj

    def create(self, name: str, **kwargs: Any) -> T:
        """Build a fresh component; a ``None`` kwarg for a parameter the factory declares is
        dropped so its default wins. A ``None`` for a name it does not declare (a misspelt
        option, ``stesp: null``) is passed on, so it is refused as an unknown option instead of
        vanishing (a factory taking ``**kwargs`` cannot be checked: there it is dropped)."""
        factory = self.get(name)
        declared = _declared_parameters(factory)
        kwargs = {k: v for k, v in kwargs.items()
                  if v is not None or (declared is not None and k not in declared)}
        try:
            return factory(**kwargs)
        except TypeError as exc:
            if "argument" in str(exc):
                raise RegistryError(f"bad options for {self.kind} '{name}': {exc}") from exc
            raise

    def _unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), list(self._entries), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return (f"unknown {self.kind} '{name}'{hint} (see `robustmatrix list {self.kind}s`)")

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


def _declared_parameters(factory: Any) -> set[str] | None:
    """The keyword parameters ``factory`` declares, or None when it takes ``**kwargs`` (or has
    no readable signature)."""
    import inspect

    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


DEFENSES: Registry = Registry("defense", entry_point_group="robustmatrix.defenses",
                              builtin_modules=("defenses",))
ATTACKS: Registry = Registry("attack", entry_point_group="robustmatrix.attacks",
                             builtin_modules=("attacks",))
DATASETS: Registry = Registry("dataset", entry_point_group="robustmatrix.datasets",
                              builtin_modules=("bench.data",))
MODELS: Registry = Registry("model", entry_point_group="robustmatrix.models",
                            builtin_modules=("bench.models",))


def create_defense(name: str, **kwargs: Any):
    return DEFENSES.create(name, **kwargs)


def create_attack(name: str, **kwargs: Any):
    return ATTACKS.create(name, **kwargs)


def create_dataset(name: str, **kwargs: Any):
    return DATASETS.create(name, **kwargs)


def create_model(name: str, **kwargs: Any):
    return MODELS.create(name, **kwargs)


def list_defenses(pattern: str = "*", **kw: Any) -> list[str]:
    return DEFENSES.list(pattern, **kw)


def list_attacks(pattern: str = "*", **kw: Any) -> list[str]:
    return ATTACKS.list(pattern, **kw)


def list_datasets(pattern: str = "*", **kw: Any) -> list[str]:
    return DATASETS.list(pattern, **kw)


def list_models(pattern: str = "*", **kw: Any) -> list[str]:
    return MODELS.list(pattern, **kw)
