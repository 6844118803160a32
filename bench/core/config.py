"""The benchmark configuration: a dataclass built from a YAML file, a preset or CLI flags.

Validation happens here, before anything runs or is stored, and every problem is a
:class:`ConfigError` whose message is one line naming the problem and the fix.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.core.hashing import json_sha256
from bench.core.schema import Schedule, Threat

PRESETS_DIR = Path(__file__).parent.parent / "presets"
THREATS = Threat.values()
SCHEDULES = Schedule.values()
ADAPTIVE_KEYS = ("enabled", "eot_draws", "transfer", "reject_class", "rand_autoattack", "square",
                 "square_queries", "wrong_label_latent", "pgd_steps", "detector_weight",
                 "detector_margin", "bpda_identity")
CHECK_KEYS = ("convergence_subset", "convergence_tol", "large_eps_subset", "defaults",
              "binarization_subset", "binarization_min_pass", "stability_subset",
              "stability_tol", "sanity_subset", "binarization_inner", "sanity_queries")
#: the sanity checks every config runs (``checks: {defaults: false}`` turns them off), each on a
#: bounded subsample of a cell's clean-correct points (docs/checklist.md); an explicit
#: ``checks:`` key overrides its default. Sized so that the `quick` preset costs at most ~1.3x
#: the run without them (benchmarks/default_checks_cost.py, docs/performance.md)
DEFAULT_CHECKS: dict[str, Any] = {"convergence_subset": 4, "large_eps_subset": 8,
                                  "binarization_subset": 6, "binarization_inner": 127,
                                  "stability_subset": 8, "sanity_subset": 4,
                                  "sanity_queries": 100}
MAX_N = 1_000_000
MAX_BATCH = 65_536


def one_line(text: object) -> str:
    """``str(text)`` on ONE line: line breaks and other control characters (a user's value can
    hold them, e.g. a YAML key ``"\\n"``) are shown escaped, as ``repr`` shows them."""
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in str(text))


class ConfigError(ValueError):
    """A malformed benchmark configuration (one-line message with the fix)."""

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(message))


#: the fit scales (EVALUATION.md "Scales"); each trainable defense maps them to its settings
FIT_PRESETS = ("tiny", "quick", "standard", "full")


@dataclass
class ComponentSpec:
    """A registry name plus options; ``label`` is the name shown in tables."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            self.label = self.name


@dataclass
class DatasetSpec:
    name: str
    n: int = 100
    options: dict[str, Any] = field(default_factory=dict)  # root, source, resolution, split


@dataclass
class BenchmarkConfig:
    name: str = "custom"
    datasets: list[DatasetSpec] = field(default_factory=list)
    defenses: list[ComponentSpec] = field(default_factory=list)
    attacks: list[ComponentSpec] = field(default_factory=list)
    #: threat -> list of epsilons; an empty list means the dataset's default epsilon
    threat_models: dict[str, list[float]] = field(default_factory=lambda: {"linf": []})
    seed: int = 0
    device: str = "auto"
    #: examples per batch, or "auto" (fills the device, see bench/harness/executors.py)
    batch_size: int | str = 100
    #: "local" (in-process) or "ray" (a task per batch; executor_options: EXECUTOR_OPTIONS);
    #: neither changes results, so neither is in the config hash
    executor: str = "local"
    executor_options: dict[str, Any] = field(default_factory=dict)
    #: GPU path: autocast for the attack's passes (false, true = bf16, fp16), torch.compile of
    #: the attacked model, channels-last ("auto" = on CUDA); re-scoring always runs in fp32
    amp: Any = False
    compile: bool = False
    channels_last: Any = "auto"
    schedule: str = "full"
    random_draws: int = 5
    fit_preset: str = "quick"
    run_dir: str = "runs/default"
    #: adaptive attacks chosen from each defense's structure: true/false or a mapping of
    #: options (ADAPTIVE_KEYS; defaults in bench/harness/adaptive_policy.py)
    adaptive: Any = True
    #: reliability checks (CHECK_KEYS) merged over DEFAULT_CHECKS (docs/checklist.md), e.g.
    #: {convergence_subset: 16, large_eps_subset: 16}
    checks: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def config_hash(self) -> str:
        d = self.to_dict()
        for k in ("run_dir", "executor", "executor_options"):
            d.pop(k, None)
        return json_sha256(d)


_TOP_KEYS = {f for f in BenchmarkConfig.__dataclass_fields__}
EXECUTORS = ("local", "ray")
EXECUTOR_OPTIONS = ("address", "num_cpus", "num_gpus", "threads", "defense_transfer",
                    "max_in_flight")
AMP_VALUES = (False, True, "bf16", "fp16")


def parse_eps(value: Any, where: str = "epsilon") -> float:
    """A number, or a string like ``"8/255"``; rejects NaN, infinities and negatives."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number, got {value!r}; write e.g. 8/255 or 0.5")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*(?:/\s*([0-9.eE+-]+)\s*)?", value)
        try:
            if not m:
                raise ValueError
            value = float(m.group(1)) / (float(m.group(2)) if m.group(2) else 1.0)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"{where}: cannot read {value!r} as a number; write e.g. 8/255 "
                              "or 0.5") from None
    if not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}; "
                          "write e.g. 8/255 or 0.5")
    value = float(value)
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ConfigError(f"{where}: must be a finite number >= 0, got {value}; e.g. 8/255")
    return value


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    try:
        f = float(value)
        if not math.isfinite(f) or f != int(f):
            raise ValueError
        i = int(f)
    except (ValueError, OverflowError):
        raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if not lo <= i <= hi:
        raise ConfigError(f"{where}: must be between {lo} and {hi}, got {i}")
    return i


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a registry name (a non-empty string), got {value!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.@:+\-\[\]=,/ ]{1,200}", value):
        raise ConfigError(f"{where}: {value!r} contains characters not allowed in a name; use "
                          "letters, digits and _ - . @ :")
    return value.strip()


def _component(item: Any, where: str) -> ComponentSpec:
    if isinstance(item, str):
        return ComponentSpec(_name(item, where))
    if isinstance(item, dict):
        item = dict(item)
        if "name" not in item:
            raise ConfigError(f"{where}: each entry needs a 'name' key, got keys "
                              f"{sorted(map(str, item))}")
        name = _name(item.pop("name"), where + ".name")
        label = item.pop("label", "") or ""
        if not isinstance(label, str) or not label.isprintable() or len(label) > 200:
            raise ConfigError(f"{where}.label: expected a one-line string (at most 200 "
                              f"characters), got {label!r}")
        options = item.pop("options", {}) or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{where}.options: expected a mapping, got {options!r}")
        options.update(item)
        for key in options:
            if not isinstance(key, str) or not key.isidentifier():
                raise ConfigError(f"{where}: option name {key!r} is not a valid option name; in a "
                                  "flow mapping ({...}) a comma ends the value, so quote values "
                                  "that contain commas (label: 'a, b')")
        check_option_bounds(options, where)
        return ComponentSpec(name, options, label)
    raise ConfigError(f"{where}: expected a name or a mapping with 'name', got {item!r}")


def _unique_labels(specs: list[ComponentSpec], kind: str) -> None:
    seen: dict[str, ComponentSpec] = {}
    for s in specs:
        if s.label in seen:
            if seen[s.label].options == s.options:
                raise ConfigError(f"{kind} '{s.label}' is listed twice; remove the duplicate")
            raise ConfigError(f"two {kind}s are labelled '{s.label}' with different options; give "
                              "each a distinct 'label:'")
        seen[s.label] = s


#: the most values (list items, mapping entries, scalars) a config may hold: a YAML alias bomb
#: ("billion laughs") expands to far more and is refused before anything walks it
MAX_CONFIG_VALUES = 100_000
#: never a run directory (results.sqlite, adv/ and leaderboard/ are written there; tests and
#: CI often run as root): the directory itself and everything under it
SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
               "/run", "/sbin", "/sys", "/usr", "/var/lib", "/var/log", "/var/run", "/var/spool",
               "/private/etc", "/private/var/db", "/System", "/Library")


def _check_size(raw: Any, source: str) -> None:
    count, stack = 0, [raw]
    while stack:
        v = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(f"{source}: the config holds more than {MAX_CONFIG_VALUES} values "
                              "(a YAML alias bomb?); write the options out plainly")
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            stack.extend(v)


def check_run_dir(value: Any, where: str = "run_dir") -> str:
    """A run directory the harness may write into: a printable path that does not resolve
    (``..`` and symlinks followed) to ``/`` or a system directory (:data:`SYSTEM_DIRS`), nor to
    an existing file. ``..`` segments are allowed and normalised (MatrixRunner resolves the
    path); returns ``value`` unchanged."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    if not value.isprintable():
        raise ConfigError(f"{where}: {value!r} contains control characters (a line break, NUL); "
                          "choose a plain path, e.g. runs/my_run")
    try:
        resolved = Path(value).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot use {value!r} as a folder ({exc}); choose a plain "
                          "path, e.g. runs/my_run") from None
    system = [d for d in SYSTEM_DIRS if resolved == Path(d) or Path(d) in resolved.parents]
    if resolved == Path(resolved.anchor) or system:
        raise ConfigError(f"{where}: {value!r} resolves to {resolved}, a system directory; "
                          "choose a folder of your own, e.g. runs/my_run")
    if resolved.exists() and not resolved.is_dir():
        raise ConfigError(f"{where}: {resolved} exists and is not a directory; choose another "
                          "path")
    return value


#: the largest config file read (a benchmark config is a few hundred bytes; ``/dev/zero`` or a
#: multi-GB file is refused before it is read)
MAX_CONFIG_BYTES = 1 << 20
#: the longest ``--option KEY=VALUE`` value parsed as YAML
MAX_OPTION_CHARS = 10_000
#: bounds of the numeric options of defenses and attacks, by name (``None`` means "the
#: component's default"); a name ending in ``_<name>`` (``val_steps``, ``finetune_epochs``) gets
#: the same upper bound with 0 allowed. Generous: they stop ``steps: 1000000000000`` or
#: ``epochs: -3``, not a long but real evaluation
OPTION_BOUNDS: dict[str, tuple[int, int]] = {
    "steps": (1, 100_000), "restarts": (1, 1_000), "n_restarts": (1, 1_000),
    "epochs": (1, 10_000), "batch_size": (1, MAX_BATCH), "n": (1, MAX_N),
    "n_queries": (1, 10_000_000), "eot_draws": (1, 10_000), "iterations": (1, 100_000),
    "max_iter": (1, 100_000)}


def _bound_for(key: str) -> tuple[int, int] | None:
    if key in OPTION_BOUNDS:
        return OPTION_BOUNDS[key]
    tail = key.rsplit("_", 1)[-1]
    if "_" in key and tail in OPTION_BOUNDS:
        return 0, OPTION_BOUNDS[tail][1]
    return None


def check_option_bounds(options: Any, where: str) -> None:
    """Refuse a numeric option outside :data:`OPTION_BOUNDS` (also inside nested mappings such
    as ``inner_options``), one line naming the option, its bounds and the fix."""
    if not isinstance(options, dict):
        return
    for key, value in options.items():
        if isinstance(value, dict):
            check_option_bounds(value, f"{where}.{key}")
            continue
        bounds = _bound_for(str(key))
        if bounds is None or value is None:
            continue
        lo, hi = bounds
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and (not math.isfinite(value) or value != int(value))):
            raise ConfigError(f"{where}.{key}: expected an integer between {lo} and {hi}, got "
                              f"{value!r}")
        if not lo <= value <= hi:
            raise ConfigError(f"{where}.{key}: must be between {lo} and {hi}, got {int(value)}; "
                              f"give e.g. {key}: {max(lo, min(hi, 10))}")


def check_top_level(raw: Any, source: str) -> None:
    """A config is a mapping; an empty file, ``/dev/null`` or a YAML list is named as such."""
    if raw is None:
        raise ConfigError(f"{source}: the config is empty; write a mapping with at least "
                          "datasets, defenses and attacks (see bench/presets/smoke.yaml) or use "
                          "a preset (smoke, quick, full)")
    if not isinstance(raw, dict):
        kind = {list: "a list", str: "a plain string"}.get(type(raw), type(raw).__name__)
        raise ConfigError(f"{source}: the top level must be a mapping of keys (datasets:, "
                          f"defenses:, attacks:, ...), got {kind}; see bench/presets/smoke.yaml")


def read_config_file(path: str | Path) -> Any:
    """The YAML of a config file, read safely: only a regular file (a FIFO, a device such as
    ``/dev/zero`` or a folder is refused before it is opened), at most
    :data:`MAX_CONFIG_BYTES`, parsed with ``yaml.safe_load`` (no ``!!python`` tags)."""
    import os
    import stat

    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the file ({exc.strerror or exc}); give a preset or "
                          "a YAML file") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise ConfigError(f"{p} is {kind}, not a config file; give a preset (smoke, quick, full) "
                          "or a YAML file")
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p} is {st.st_size} bytes, more than a config may be "
                          f"({MAX_CONFIG_BYTES} bytes); give a YAML config file")
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:  # it grew while being read
            raise ConfigError(f"{p} holds more than {MAX_CONFIG_BYTES} bytes; give a YAML "
                              "config file")
        return yaml.safe_load(data.decode("utf-8"))
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        tag = " (tags such as !!python are not allowed)" if isinstance(
            exc, yaml.constructor.ConstructorError) else ""
        raise ConfigError(f"{p}: not valid YAML{where}{tag}; fix the syntax") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read the file ({exc}); give a YAML text file") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply to be a config; write it out plainly") from None


def parse_option(kv: str, flag: str = "--option") -> tuple[str, Any]:
    """``KEY=VALUE`` from the command line, VALUE parsed with ``yaml.safe_load``: invalid YAML,
    a ``!!python`` tag or a non-identifier KEY is a one-line :class:`ConfigError`."""
    k, sep, v = str(kv).partition("=")
    k = k.strip()
    if not sep or not k:
        raise ConfigError(f"{flag} {kv!r}: write KEY=VALUE, e.g. {flag} steps=10")
    if not k.isidentifier():
        raise ConfigError(f"{flag} {kv!r}: {k!r} is not an option name; write KEY=VALUE, e.g. "
                          f"{flag} steps=10")
    if len(v) > MAX_OPTION_CHARS:
        raise ConfigError(f"{flag} {k}: the value is longer than {MAX_OPTION_CHARS} characters")
    try:
        value = yaml.safe_load(v)
    except yaml.constructor.ConstructorError:
        raise ConfigError(f"{flag} {k}={v!r}: YAML tags such as !!python are not allowed; give "
                          "a plain value (a number, a string, [a, list] or {a: mapping})") from None
    except yaml.YAMLError:
        raise ConfigError(f"{flag} {k}={v!r}: not a valid YAML value; quote a string "
                          f"({k}='...') or fix the brackets") from None
    except RecursionError:
        raise ConfigError(f"{flag} {k}: nested too deeply; write the value plainly") from None
    _check_size(value, flag)
    return k, value


def parse_options(pairs: list[str], flag: str = "--option", where: str = "--option"
                  ) -> dict[str, Any]:
    """Several ``KEY=VALUE`` (:func:`parse_option`), bounds-checked (:data:`OPTION_BOUNDS`)."""
    out = dict(parse_option(kv, flag) for kv in pairs)
    check_option_bounds(out, where)
    return out


def config_from_dict(raw: Any, *, source: str = "config") -> BenchmarkConfig:
    """Validate a raw mapping (from YAML or flags) into a :class:`BenchmarkConfig`."""
    check_top_level(raw, source)
    _check_size(raw, source)
    unknown = set(raw) - _TOP_KEYS - {"n", "epsilons"}
    if unknown:
        import difflib

        k = sorted(map(str, unknown))[0]
        close = difflib.get_close_matches(k, _TOP_KEYS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {sorted(_TOP_KEYS)}"
        raise ConfigError(f"{source}: unknown key '{k}'{hint}")
    cfg = BenchmarkConfig()
    if "name" in raw:
        cfg.name = _name(str(raw["name"]), "name")
    n_default = _int(raw.get("n", 100), "n", 1, MAX_N)

    datasets = raw.get("datasets", ["cifar10"])
    if isinstance(datasets, str):
        datasets = [datasets]
    if not isinstance(datasets, list) or not datasets:
        raise ConfigError(f"{source}: 'datasets' must be a non-empty list, e.g. [cifar10]")
    for i, d in enumerate(datasets):
        spec = _component(d, f"datasets[{i}]")
        n = _int(spec.options.pop("n", n_default), f"datasets[{i}].n", 1, MAX_N)
        cfg.datasets.append(DatasetSpec(spec.name, n, spec.options))

    for key, kind in (("defenses", "defense"), ("attacks", "attack")):
        items = raw.get(key)
        if isinstance(items, str):
            items = [items]
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{source}: '{key}' must be a non-empty list of {kind} names, e.g. "
                              f"[{'undefended' if kind == 'defense' else 'pgd'}]")
        specs = [_component(x, f"{key}[{i}]") for i, x in enumerate(items)]
        _unique_labels(specs, kind)
        setattr(cfg, key, specs)

    tm = raw.get("threat_models", {"linf": []})
    if isinstance(tm, str):
        tm = [tm]
    if isinstance(tm, list):
        if not all(isinstance(t, str) for t in tm):
            raise ConfigError(f"threat_models: expected threat names (linf, l2), got {tm!r}")
        tm = {t: [] for t in tm}
    if not isinstance(tm, dict) or not tm:
        raise ConfigError(f"{source}: 'threat_models' must map a threat (linf, l2) to a list of "
                          "epsilons, e.g. {linf: [8/255]}")
    cfg.threat_models = {}
    for t, eps_list in tm.items():
        if t not in THREATS:
            raise ConfigError(f"threat_models: unknown threat {t!r}; use one of {list(THREATS)}")
        if eps_list is None:
            eps_list = []
        if not isinstance(eps_list, list):
            eps_list = [eps_list]
        parsed = [parse_eps(e, f"threat_models.{t}") for e in eps_list]
        if t == "linf":
            for e in parsed:
                if e > 1:
                    raise ConfigError(f"threat_models.linf: epsilon {e} exceeds the [0, 1] image "
                                      f"range; did you mean {e}/255?")
        cfg.threat_models[t] = parsed

    cfg.seed = _int(raw.get("seed", 0), "seed", 0, 2**32 - 1)
    bs = raw.get("batch_size", 100)
    cfg.batch_size = "auto" if bs == "auto" else _int(bs, "batch_size", 1, MAX_BATCH)
    cfg.random_draws = _int(raw.get("random_draws", 5), "random_draws", 1, 1000)
    _executor(raw, cfg)
    device = raw.get("device", "auto")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
        raise ConfigError(f"device: expected auto, cpu, cuda, cuda:N or mps, got {device!r}")
    cfg.device = device
    schedule = raw.get("schedule", "full")
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule: expected one of {list(SCHEDULES)}, got {schedule!r}")
    cfg.schedule = schedule
    fp = raw.get("fit_preset", "quick")
    if fp not in FIT_PRESETS:
        raise ConfigError(f"fit_preset: expected one of {', '.join(FIT_PRESETS)}, got {fp!r}")
    cfg.fit_preset = fp
    adaptive = raw.get("adaptive", True)
    if isinstance(adaptive, dict):
        bad = sorted(set(map(str, adaptive)) - set(ADAPTIVE_KEYS))
        if bad:
            raise ConfigError(f"adaptive: unknown option {bad[0]!r}; known: {list(ADAPTIVE_KEYS)}")
    elif not isinstance(adaptive, bool):
        raise ConfigError(f"adaptive: expected true, false or a mapping of options, got "
                          f"{adaptive!r}")
    cfg.adaptive = adaptive
    checks = raw.get("checks") or {}
    if not isinstance(checks, dict):
        raise ConfigError(f"checks: expected a mapping, e.g. {{convergence_subset: 16}}, got "
                          f"{checks!r}")
    bad = sorted(set(map(str, checks)) - set(CHECK_KEYS))
    if bad:
        raise ConfigError(f"checks: unknown option {bad[0]!r}; known: {list(CHECK_KEYS)}")
    defaults = checks.pop("defaults", True)
    if not isinstance(defaults, bool):
        raise ConfigError(f"checks.defaults: expected true or false, got {defaults!r}")
    checks = {**(DEFAULT_CHECKS if defaults else {}), **checks}
    for k in ("convergence_subset", "large_eps_subset", "binarization_subset",
              "stability_subset", "sanity_subset", "binarization_inner", "sanity_queries"):
        if k in checks:
            checks[k] = _int(checks[k], f"checks.{k}", 0, MAX_N)
    if checks.get("binarization_inner", 2) < 2:
        raise ConfigError(f"checks.binarization_inner: expected at least 2 (the clean point and "
                          f"one inner point), got {checks['binarization_inner']}")
    if "convergence_tol" in checks:
        tol = checks["convergence_tol"]
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol <= 1:
            raise ConfigError(f"checks.convergence_tol: expected a number in [0, 1], got {tol!r}")
    for k in ("binarization_min_pass", "stability_tol"):
        v = checks.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or not 0 <= v <= 10):
            raise ConfigError(f"checks.{k}: expected a number in [0, 10], got {v!r}")
    cfg.checks = dict(checks)
    if "run_dir" in raw:
        cfg.run_dir = check_run_dir(raw["run_dir"])
    else:
        cfg.run_dir = check_run_dir(f"runs/{cfg.name}", "name (the default run_dir runs/<name>)")
    return cfg


def _executor(raw: dict, cfg: BenchmarkConfig) -> None:
    """``executor: ray`` or ``executor: {name: ray, num_gpus: 0.25}``; ``executor_options``; the
    GPU path keys ``amp``, ``compile``, ``channels_last``."""
    ex = raw.get("executor", "local")
    opts = raw.get("executor_options") or {}
    if not isinstance(opts, dict):
        raise ConfigError(f"executor_options: expected a mapping, got {opts!r}")
    opts = dict(opts)
    if isinstance(ex, dict):
        ex = dict(ex)
        name = ex.pop("name", "ray")
        opts.update(ex)
        ex = name
    if ex not in EXECUTORS:
        raise ConfigError(f"executor: expected one of {list(EXECUTORS)}, got {ex!r}")
    bad = sorted(set(map(str, opts)) - set(EXECUTOR_OPTIONS))
    if bad:
        raise ConfigError(f"executor options: unknown option {bad[0]!r}; known: "
                          f"{list(EXECUTOR_OPTIONS)}")
    if opts and ex != "ray":
        raise ConfigError(f"executor options {sorted(opts)} apply to the ray executor; set "
                          "executor: ray or drop them")
    cfg.executor, cfg.executor_options = ex, opts
    amp = raw.get("amp", False)
    if amp not in AMP_VALUES or isinstance(amp, (int, float)) and not isinstance(amp, bool):
        raise ConfigError(f"amp: expected false, true (bfloat16) or fp16, got {amp!r}")
    cfg.amp = amp
    for key, allowed in (("compile", (False, True)), ("channels_last", ("auto", False, True))):
        v = raw.get(key, allowed[0])
        if not any(v is a or (isinstance(a, str) and v == a) for a in allowed):
            raise ConfigError(f"{key}: expected one of {list(allowed)}, got {v!r}")
        setattr(cfg, key, v)


def load_config(path_or_preset: str) -> BenchmarkConfig:
    """A preset name (``smoke``, ``quick``, ``full``) or a path to a YAML file."""
    p = Path(path_or_preset)
    if not p.suffix and (PRESETS_DIR / f"{path_or_preset}.yaml").exists():
        p = PRESETS_DIR / f"{path_or_preset}.yaml"
    if not p.exists():
        presets = sorted(x.stem for x in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"no preset or config file '{path_or_preset}'; use a preset "
                          f"({', '.join(presets)}) or a path to a YAML file")
    raw = read_config_file(p)
    return config_from_dict(raw, source=str(p))


def list_presets() -> list[str]:
    return sorted(x.stem for x in PRESETS_DIR.glob("*.yaml"))
