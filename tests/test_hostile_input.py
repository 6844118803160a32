"""Hostile input never gets a traceback (docs/reliability.md).

* property-based: arbitrary values for ``config_from_dict`` (dicts, lists, strings with line
  breaks and NUL, unicode, huge and negative numbers, NaN, infinities, wrong types, unknown
  keys, alias bombs) and arbitrary ``robustmatrix run`` command lines: each one is either
  accepted as a config that satisfies every documented bound, or refused with ONE line
  (``ConfigError`` / ``robustmatrix: error: ...``, exit status 2);
* paths: a run directory that resolves to a system directory is refused, ``..`` segments are
  normalised; files given as artifacts, checkpoints or stored adversarials that are not what
  they claim (``/etc/passwd``, an HTML page, a path escaping the run directory) are refused on
  one line;
* data trees: a corrupt image, an HTML page or a decompression bomb saved as an image, an
  empty class folder or a wrong image size give a one-line error, or a counted skip with
  ``on_bad_image: skip`` in the dataset's options.

The number of configs and command lines tried is printed at the end of the module
(``pytest -s``) and was reported with the issue.
"""

from __future__ import annotations

import contextlib
import io
import math
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bench.harness.runner
from bench.cli import main
from bench.core.config import MAX_BATCH, MAX_N, THREATS, ConfigError, config_from_dict, load_config

COUNTS = {"configs": 0, "configs_accepted": 0, "cli": 0, "cli_accepted": 0, "paths": 0,
          "files": 0}
FUZZ = settings(max_examples=600, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print(f"\nhostile input: {COUNTS['configs']} configs fuzzed ({COUNTS['configs_accepted']} "
          f"valid), {COUNTS['cli']} command lines ({COUNTS['cli_accepted']} valid), "
          f"{COUNTS['paths']} hostile paths, {COUNTS['files']} hostile files; 0 tracebacks")


def assert_one_line(text: str) -> None:
    assert text and text == text.strip() and len(text.splitlines()) == 1, repr(text)
    assert "Traceback" not in text


# strategies -----------------------------------------------------------------------------------
NASTY_STRINGS = [
    "", " ", "\n", "a\nb", "\r\n", "\x00", "nul\x00byte", "\u2028", "\x1b[31mred", "é", "💥",
    "８/２５５", "8/255", "8/0", "0/0", "1e999", "-1e999", "nan", "-nan", "inf", "-0", "1e-320",
    "0x10", "1_000", "  4/255  ", "255/8", "-8/255", "cifar10", "test_tiny", "test_undefended",
    "pgd", "test_pgd", "linf", "l2", "none", "auto", "cpu", "cuda:99", "mps", "full",
    "worst-case", "quick", "tiny", "../../etc", "/etc", "/", "~", "~nosuchuser/x", "x" * 5000,
    "{name: pgd}", "[a, b]", "!!python/object:os.system", "%s%s%n", "' OR 1=1 --",
    "$(touch /tmp/pwned)", "; rm -rf /", "C:\\Windows", "runs/../runs/x",
]
NUMBERS = st.one_of(
    st.integers(), st.integers(min_value=-2**80, max_value=2**80), st.just(10**400),
    st.floats(), st.just(float("nan")), st.just(float("inf")), st.just(-0.0),
    st.sampled_from([0, 1, -1, 2**31, 2**63, MAX_N, MAX_N + 1, MAX_BATCH, MAX_BATCH + 1, 1e12,
                     8 / 255, 255.0, 0.5, 1.0000001]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=12),
                    st.sampled_from(NASTY_STRINGS), st.binary(max_size=6))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.tuples(inner, inner),
        st.frozensets(st.integers(), max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(["name", "n", "options", "label", "root",
                                                   "source", "resolution", "threat", "steps"]),
                                  st.text(max_size=6), st.integers(), st.none(), st.booleans()),
                        inner, max_size=4)),
    max_leaves=12)
TOP_KEYS = ["name", "datasets", "defenses", "attacks", "threat_models", "n", "seed", "device",
            "batch_size", "schedule", "random_draws", "fit_preset", "run_dir", "epsilons",
            "adaptive", "checks", "executor", "executor_options", "amp", "compile",
            "channels_last"]
KEYS = st.one_of(st.sampled_from(TOP_KEYS), st.text(max_size=10), st.integers(), st.none(),
                 st.booleans(), st.floats(), st.tuples(st.integers()))
SMOKE = {"name": "smoke", "datasets": ["test_tiny"], "n": 20, "defenses": ["test_undefended"],
         "attacks": ["test_pgd", {"name": "cw", "steps": 10}],
         "threat_models": {"linf": ["8/255"], "l2": [0.5]}, "batch_size": 10,
         "fit_preset": "tiny", "device": "cpu"}


@st.composite
def mutated_smoke(draw):
    """The smoke config with one to three entries replaced, deleted or added."""
    raw = {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
           for k, v in SMOKE.items()}
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(TOP_KEYS + ["bogus_key"]))
        how = draw(st.sampled_from(["replace", "delete", "nest"]))
        if how == "delete":
            raw.pop(key, None)
        elif how == "nest" and isinstance(raw.get(key), list) and raw[key]:
            raw[key][draw(st.integers(0, len(raw[key]) - 1))] = draw(VALUES)
        elif how == "nest" and isinstance(raw.get(key), dict):
            raw[key][draw(KEYS)] = draw(VALUES)
        else:
            raw[key] = draw(VALUES)
    return raw


def _alias_bomb(depth: int = 9, width: int = 9):
    """What a YAML 'billion laughs' gives after yaml.safe_load: shared lists, 9**9 leaves."""
    node: list = ["lol"] * width
    for _ in range(depth - 1):
        node = [node] * width
    return node


def check_config(raw) -> None:
    """Accepted and within every documented bound, or ONE ConfigError line."""
    COUNTS["configs"] += 1
    try:
        cfg = config_from_dict(raw)
    except ConfigError as exc:
        assert_one_line(str(exc))
        return
    COUNTS["configs_accepted"] += 1
    assert cfg.datasets and cfg.defenses and cfg.attacks
    for d in cfg.datasets:
        assert isinstance(d.name, str) and d.name.strip() and 1 <= d.n <= MAX_N
    for c in cfg.defenses + cfg.attacks:
        assert isinstance(c.name, str) and c.name.strip() and c.name.isprintable()
    assert set(cfg.threat_models) <= set(THREATS)
    for t, eps in cfg.threat_models.items():
        for e in eps:
            assert isinstance(e, float) and math.isfinite(e) and e >= 0
            assert t != "linf" or e <= 1
    assert isinstance(cfg.seed, int) and 0 <= cfg.seed < 2**32
    assert cfg.batch_size == "auto" or 1 <= cfg.batch_size <= MAX_BATCH
    assert 1 <= cfg.random_draws <= 1000
    assert cfg.schedule in ("full", "worst-case") and cfg.fit_preset in ("quick", "full", "tiny")
    assert isinstance(cfg.run_dir, str) and cfg.run_dir.isprintable()
    cfg.config_hash()  # serialisable, quickly


# config_from_dict ------------------------------------------------------------------------------
@FUZZ
@given(st.one_of(VALUES, st.dictionaries(KEYS, VALUES, max_size=8)))
def test_arbitrary_values_as_a_config(raw):
    check_config(raw)


@settings(FUZZ, max_examples=1200)
@given(mutated_smoke())
def test_the_smoke_config_with_hostile_entries(raw):
    check_config(raw)


@pytest.mark.parametrize("raw", [
    {"n": 0}, {"n": -5}, {"n": 10**400}, {"n": float("nan")}, {"n": "1e999"}, {"n": True},
    {"n": 2.5}, {"batch_size": 0}, {"batch_size": 10**12}, {"batch_size": "1e12"},
    {"seed": -1}, {"seed": 2**64}, {"random_draws": 0},
    {"threat_models": {"linf": [-0.1]}}, {"threat_models": {"linf": [float("nan")]}},
    {"threat_models": {"linf": ["inf"]}}, {"threat_models": {"linf": [8]}},
    {"threat_models": {"linf": ["8/0"]}}, {"threat_models": {"l7": [1]}},
    {"threat_models": {"linf": [True]}}, {"threat_models": {}}, {"threat_models": 3},
    {"datasets": []}, {"datasets": [{"n": 3}]}, {"datasets": [{1: 2, "x": 3}]},
    {"datasets": [{"name": "test_tiny", "n": 0}]}, {"defenses": [None]}, {"attacks": [[]]},
    {"defenses": ["a\nb"]}, {"attacks": ["pgd\x00"]}, {"name": "x\ny"},
    {"defenses": [{"name": "test_undefended", "label": "a\nb"},
                  {"name": "test_undefended", "label": "a\nb"}]},
    {"device": "cuda:x"}, {"device": ["cpu"]}, {"schedule": "fastest"}, {"fit_preset": None},
    {"unknown\nkey": 1}, {"\u2028": 1}, {("tuple", "key"): 1}, {None: 1},
    {"attacks": [{"name": "test_pgd", "junk": "ALIAS_BOMB"}]},
    {"defenses": [{"name": "test_undefended", "options": {"x": "ALIAS_BOMB"}}]},
    {"threat_models": {"linf": "ALIAS_BOMB"}},
], ids=lambda r: repr(r)[:60])
def test_named_hostile_configs_are_refused_on_one_line(raw):
    def bombed(v):  # built here: pytest never repr()s a billion-leaf parameter
        if v == "ALIAS_BOMB":
            return _alias_bomb()
        if isinstance(v, dict):
            return {k: bombed(x) for k, x in v.items()}
        if isinstance(v, list):
            return [bombed(x) for x in v]
        return v

    full = {**SMOKE, **bombed(raw)}
    COUNTS["configs"] += 1
    with pytest.raises(ConfigError) as info:
        config_from_dict(full)
    assert_one_line(str(info.value))


def _yaml_bomb(depth: int) -> str:
    """Inline YAML anchors: ``depth`` levels of 9 aliases each, 9 ** (depth + 1) leaves."""
    node = "&a0 [" + ", ".join(["lol"] * 9) + "]"
    for i in range(1, depth + 1):
        node = f"&a{i} [{node}, " + ", ".join([f"*a{i - 1}"] * 8) + "]"
    return node


def test_hostile_yaml_files(tmp_path):
    cases = {
        "tags.yaml": "!!python/object/apply:os.system ['touch /tmp/robustmatrix-pwned']\n",
        "tag_in_value.yaml": "datasets: !!python/object/new:os.system [echo hi]\n",
        "bomb.yaml": "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
                     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c]\n",
        "bomb_in_options.yaml": ("datasets: [test_tiny]\ndefenses: [test_undefended]\n"
                                 f"attacks: [{{name: test_pgd, junk: {_yaml_bomb(8)}}}]\n"),
        "binary.yaml": b"\xff\xfe\x00\x00garbage\x00\x01",
        "empty.yaml": "",
        "scalar.yaml": "42\n",
        "deep.yaml": "datasets: " + "[" * 2000 + "]" * 2000 + "\n",
        "tabs.yaml": "datasets:\n\t- test_tiny\n",
        "unknown_tag.yaml": "datasets: !custom [test_tiny]\n",
    }
    for name, text in cases.items():
        p = tmp_path / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        COUNTS["files"] += 1
        with pytest.raises(ConfigError) as info:
            load_config(str(p))
        assert_one_line(str(info.value))
    assert not Path("/tmp/robustmatrix-pwned").exists()


# the command line ------------------------------------------------------------------------------
class Accepted(Exception):
    """Raised by the stub runner: the command line passed every validation."""


class StubRunner:
    def __init__(self, cfg, **kw):
        raise Accepted(cfg)


FLAGS = ["--dataset", "--defense", "--attack", "--threat", "--n", "--seed", "--device",
         "--batch-size", "--schedule", "--data-root", "--run-dir", "--executor", "--address"]
ARG_VALUES = st.one_of(st.sampled_from(NASTY_STRINGS), st.text(max_size=12),
                       st.integers(-10**6, 10**13).map(str),
                       st.sampled_from(["linf=8/255", "l2=0.5", "linf=", "=8/255", "linf=1,2,3",
                                        "linf=nan", "l2=-1", "linf=8/255,", "linf=,,", "l7",
                                        "ray", "local", "test_tiny", "test_undefended",
                                        "test_pgd", "auto", "worst-case"]))


@st.composite
def command_lines(draw):
    argv = ["run", draw(st.sampled_from(["smoke", "quick", "nosuchpreset", "smoke.yaml", "",
                                         "/etc/passwd", "../../etc/passwd", "a\x00b", "\n",
                                         "/dev/null", "/"]))]
    for _ in range(draw(st.integers(0, 5))):
        flag = draw(st.one_of(st.sampled_from(FLAGS), st.sampled_from(["--bogus", "-x", "--",
                                                                        "--no-progress"])))
        argv.append(flag)
        if flag.startswith("--") and flag not in ("--", "--no-progress"):
            argv.append(draw(ARG_VALUES))
    return argv


@contextlib.contextmanager
def stub_runner():
    real = bench.harness.runner.MatrixRunner
    bench.harness.runner.MatrixRunner = StubRunner
    try:
        yield
    finally:
        bench.harness.runner.MatrixRunner = real


def run_cli(argv: list[str]) -> tuple[str, int | None, str]:
    """('accepted' | 'refused', exit status, stderr) of ``robustmatrix`` with the stub runner."""
    err = io.StringIO()
    code: int | None = None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            stub_runner(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = main(argv)
        except Accepted:
            return "accepted", None, err.getvalue()
        except SystemExit as exc:  # argparse
            code = exc.code
    return "refused", code, err.getvalue()


def check_cli(argv: list[str]) -> None:
    COUNTS["cli"] += 1
    outcome, code, err = run_cli(argv)
    if outcome == "accepted":
        COUNTS["cli_accepted"] += 1
        return
    assert code == 2, (argv, code, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("robustmatrix: error: "), (argv, err)


@settings(FUZZ, max_examples=500)
@given(command_lines())
def test_arbitrary_command_lines(argv):
    check_cli(argv)


@pytest.mark.parametrize("args", [
    ["--n", "0"], ["--n", "-1"], ["--n", "1e999"], ["--n", "nan"], ["--n", "ten"],
    ["--batch-size", "0"], ["--batch-size", "99999999999"], ["--seed", "-3"],
    ["--seed", "1.5"], ["--threat", "linf=-1"], ["--threat", "linf=8"], ["--threat", "=1"],
    ["--threat", "linf=1/0"], ["--threat", "l2=inf"], ["--device", "gpu"],
    ["--device", "cuda:0; rm -rf /"], ["--schedule", "greedy"], ["--executor", "slurm"],
    ["--defense", "a\nb"], ["--attack", "pgd\x00"], ["--dataset", ""], ["--bogus"],
    ["--run-dir", "/etc"], ["--run-dir", "/"], ["--run-dir", "../../../../../../etc"],
    ["--run-dir", "/usr/lib/robustmatrix"], ["--run-dir", "/proc/self"],
    ["--run-dir", "runs/\nx"], ["--run-dir", "/etc/passwd"], ["--run-dir", "nul\x00"],
], ids=lambda a: repr(a)[:50])
def test_named_hostile_command_lines(args):
    check_cli(["run", "smoke", *args])
    assert run_cli(["run", "smoke", *args])[0] == "refused"


def test_run_dir_dot_dot_segments_are_normalised(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    COUNTS["paths"] += 1
    outcome, _, _ = run_cli(["run", "smoke", "--run-dir", "a/../b/./c/../run"])
    assert outcome == "accepted"
    cfg = config_from_dict({**SMOKE, "run_dir": "a/../b/./c/../run"})
    from bench.harness.runner import MatrixRunner

    runner = MatrixRunner(cfg, progress=False, log=lambda s: None)
    assert runner.run_dir == (tmp_path / "b" / "run").resolve()
    assert ".." not in runner.run_dir.parts


@pytest.mark.parametrize("run_dir", ["/etc", "/", "//", "/usr/../etc/x", "/sys/kernel",
                                     "/boot", "/dev/shm/../null", "../" * 30 + "etc"])
def test_system_directories_are_refused_as_run_dir(run_dir):
    COUNTS["paths"] += 1
    with pytest.raises(ConfigError, match="system directory") as info:
        config_from_dict({**SMOKE, "run_dir": run_dir})
    assert_one_line(str(info.value))


def test_a_name_cannot_walk_out_of_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    COUNTS["paths"] += 1
    depth = len(tmp_path.parts) + 2
    with pytest.raises(ConfigError, match="system directory"):
        config_from_dict({k: v for k, v in {**SMOKE, "name": "../" * depth + "etc"}.items()})


# files that are not what they claim -----------------------------------------------------------
def test_hostile_files_as_inputs_are_refused_on_one_line(tmp_path, capsys):
    """Through the CLI: a classifier checkpoint or a defense artifact that is /etc/passwd, an
    HTML page or random bytes; a store that is not a SQLite file."""
    page = tmp_path / "resnet.safetensors"
    page.write_text("<!DOCTYPE html><html><body>Sign in to GitHub</body></html>")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    cases = [
        ({"defenses": [{"name": "undefended", "classifier": str(page)}]}, "HTML page"),
        ({"defenses": [{"name": "undefended", "classifier": "/etc/passwd"}]}, "passwd"),
        ({"defenses": [{"name": "undefended", "classifier": str(junk)}]}, "junk.pt"),
    ]
    import yaml

    for i, (over, words) in enumerate(cases):
        cfg = tmp_path / f"c{i}.yaml"
        cfg.write_text(yaml.safe_dump({**SMOKE, **over, "n": 10}))
        COUNTS["files"] += 1
        assert main(["run", str(cfg), "--run-dir", str(tmp_path / f"r{i}"), "--no-progress"]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert len(err) == 1 and words in err[0], err
        assert "Traceback" not in err[0]
    # a run directory whose store is not a database
    bad = tmp_path / "notastore"
    bad.mkdir()
    (bad / "results.sqlite").write_bytes(page.read_bytes() * 50)
    for argv in (["run", "smoke", "--run-dir", str(bad), "--no-progress"],
                 ["leaderboard", "--run-dir", str(bad)]):
        COUNTS["files"] += 1
        assert main(argv) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert len(err) == 1 and "not a" in err[0], err


def test_stored_paths_cannot_escape_the_run_directory(tmp_path):
    from bench.harness.runner import load_adv

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for rel in ("../../../../etc/passwd", "/etc/passwd", "adv/../../outside.safetensors"):
        COUNTS["paths"] += 1
        with pytest.raises(ValueError, match="outside the run directory"):
            load_adv(run_dir, rel)


# data trees -------------------------------------------------------------------------------------
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def make_tree(root: Path, per_class: int = 2) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in CLASSES:
        folder = root / "cifar10-jpeg" / "test" / cls
        folder.mkdir(parents=True, exist_ok=True)
        for p in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                folder / f"{p:04d}.png")
    return root / "cifar10-jpeg" / "test"


def png_bomb() -> bytes:
    """A valid PNG header claiming 100000 x 100000 pixels (Pillow's decompression-bomb check
    must refuse it before allocating 30 GB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


def _truncated_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()[:60]


HOSTILE_IMAGES = {
    "html": b"<!DOCTYPE html><html><body>Sign in</body></html>",
    "empty": b"",
    "truncated": None,  # filled lazily (needs Pillow)
    "bomb": None,
    "text": b"GIF89a but not really",
}


@pytest.mark.parametrize("kind", list(HOSTILE_IMAGES))
def test_hostile_image_files_error_or_counted_skip(tmp_path, kind):
    from bench.data import DataError, load_split

    split = make_tree(tmp_path / "data")
    make = {"truncated": _truncated_png, "bomb": png_bomb}.get(kind, lambda: HOSTILE_IMAGES[kind])
    content = make()
    (split / "frog" / "0001.png").write_bytes(content)
    COUNTS["files"] += 1
    kw = dict(root=tmp_path / "data", cache_dir=tmp_path / "cache")
    with pytest.raises(DataError) as info:
        load_split("cifar10", **kw)
    assert_one_line(str(info.value))
    assert "0001.png" in str(info.value) and "on_bad_image" in str(info.value)
    with pytest.warns(UserWarning, match="skipped 1 bad image"):
        data = load_split("cifar10", on_bad_image="skip", **kw)
    assert data.skipped == 1 and len(data) == 19


def test_a_symlink_to_a_system_file_is_a_bad_image(tmp_path):
    from bench.data import DataError, load_split

    split = make_tree(tmp_path / "data")
    (split / "cat" / "0000.png").unlink()
    (split / "cat" / "0000.png").symlink_to("/etc/passwd")
    COUNTS["files"] += 1
    with pytest.raises(DataError, match="cannot be decoded"):
        load_split("cifar10", root=tmp_path / "data", cache_dir=tmp_path / "cache")


def test_bad_images_through_the_command_line(tmp_path, capsys, monkeypatch):
    """A corrupt image in --data-root ends the run with one line; ``on_bad_image: skip`` in
    the dataset's options (a config file) makes it a counted skip instead."""
    import yaml

    split = make_tree(tmp_path / "data", per_class=3)
    (split / "ship" / "0002.png").write_bytes(b"\x89PNG\r\n\x1a\ncorrupt")
    (split / "dog" / "0000.png").write_bytes(b"")
    monkeypatch.setenv("ROBUSTMATRIX_CACHE", str(tmp_path / "cache"))
    argv = ["--run-dir", str(tmp_path / "run"), "--no-progress", "--n", "10"]
    COUNTS["files"] += 2
    assert main(["run", "smoke", "--dataset", "cifar10", "--data-root", str(tmp_path / "data"),
                 *argv]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and "bad image" in err[0] and "on_bad_image" in err[0], err

    loaded = {}

    def capture_group(self, group, data, summary):  # stop after the data are loaded
        loaded["data"] = data

    monkeypatch.setattr(bench.harness.runner.MatrixRunner, "_run_group", capture_group)
    cfg = tmp_path / "skip.yaml"
    cfg.write_text(yaml.safe_dump({**SMOKE, "n": 10, "datasets": [
        {"name": "cifar10", "root": str(tmp_path / "data"), "on_bad_image": "skip"}]}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["run", str(cfg), *argv]) == 0
    data = loaded["data"]
    assert len(data) == 10 and data.skipped == 2
    assert not any(s in data.sample_ids for s in ("cifar10/test/8/0002", "cifar10/test/5/0000"))


def test_a_comma_in_an_unquoted_flow_mapping_value_is_named(tmp_path):
    """`{name: x, label: a (b, c)}` parses as label 'a (b' plus an option 'c)': refused with the
    fix, not passed on (Registry.create drops None-valued options, so it would vanish)."""
    path = tmp_path / "m.yaml"
    path.write_text("name: t\ndatasets: [{name: test_tiny, n: 10}]\n"
                    "defenses:\n  - {name: test_pgd_at, label: a (b, c)}\nattacks: [test_pgd]\n")
    with pytest.raises(ConfigError, match="quote values that contain commas"):
        load_config(str(path))


def test_n_flag_overrides_a_per_dataset_n(tmp_path):
    """`robustmatrix run CONFIG --n 10` evaluates 10 images even where the config sets a
    per-dataset n (issue 16 case 10: `run quick --n 40` ran the preset's n)."""
    import json

    path = tmp_path / "m.yaml"
    path.write_text("name: t\ndatasets: [{name: test_tiny, n: 30}]\ndefenses: [test_undefended]\n"
                    "attacks: [test_pgd]\nbatch_size: 10\n")
    run_dir = tmp_path / "run"
    assert main(["run", str(path), "--n", "10", "--run-dir", str(run_dir)]) == 0
    records = json.loads((run_dir / "leaderboard" / "leaderboard.json").read_text())
    assert records and all(r["n"] == 10 for r in records)
