"""Issue 16: untrusted code and files, tried as a hostile user would. One test (or more) per
numbered case of the issue, through the CLI path a user takes."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from bench.cli import main

HOSTILE = Path(__file__).resolve().parent / "hostile" / "defenses.py"
SUBMIT = ["--dataset", "test_tiny", "--n", "8", "--suite", "test", "--fit-preset", "tiny",
          "--device", "cpu", "--no-progress"]


def _last_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


# case 1: submitted code runs in a child with limits ------------------------------------------
@pytest.mark.parametrize("cls, limits, words", [
    ("Sleeps", ["--time-limit", "6"], "did not finish within 6 s"),
    ("Allocates", ["--memory-limit", "512MiB"], "allocate memory"),  # the limit hit, in the child
    ("Exits", [], "exited with status 0"),
])
def test_a_hostile_forward_fails_the_submission_in_one_line(tmp_path, capsys, cls, limits,
                                                            words):
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    code = main(["submit", f"{HOSTILE}:{cls}", *SUBMIT, "--run-dir", str(run_dir), *limits])
    assert code == 2  # never a silent success
    assert time.monotonic() - t0 < 60
    line = _last_line(capsys)
    assert line.startswith("robustmatrix: error: submission ") and words in line, line
    assert not list((run_dir / "entries").glob("*.json")) if (run_dir / "entries").exists() \
        else True


def test_a_forking_defense_is_killed_with_its_children(tmp_path, capsys):
    import tempfile

    marker = Path(tempfile.gettempdir()) / f"robustmatrix-forks-{os.getuid()}.pid"
    marker.unlink(missing_ok=True)
    code = main(["submit", f"{HOSTILE}:Forks", *SUBMIT, "--run-dir", str(tmp_path / "run"),
                 "--time-limit", "8"])
    assert code == 2
    assert "did not finish within 8 s" in _last_line(capsys)
    pid = int(marker.read_text())
    for _ in range(50):  # the killed grandchild is reaped by init shortly after
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the defense's own subprocess {pid} outlived the submission")


def test_a_class_that_raises_in_init_is_one_line(tmp_path, capsys):
    code = main(["submit", f"{HOSTILE}:RaisesInInit", *SUBMIT, "--run-dir", str(tmp_path / "r")])
    assert code == 2
    line = _last_line(capsys)
    assert "broken constructor" in line and line.startswith("robustmatrix: error:")


def test_a_failed_submission_leaves_earlier_entries_and_the_store_intact(tmp_path, capsys):
    from bench.core.store import ResultStore

    run_dir = tmp_path / "run"
    example = Path(__file__).resolve().parents[1] / "examples" / "my_defense.py"
    assert main(["submit", f"{example}:BitDepthCNN", *SUBMIT, "--run-dir", str(run_dir)]) == 0
    entries = sorted((run_dir / "entries").glob("*.json"))
    before = {p.name: p.read_bytes() for p in entries}
    store_before = {c.key: c.status for c in ResultStore(run_dir / "results.sqlite",
                                                          readonly=True).cells()}
    assert main(["submit", f"{HOSTILE}:Exits", *SUBMIT, "--run-dir", str(run_dir)]) == 2
    assert {p.name: p.read_bytes() for p in sorted((run_dir / "entries").glob("*.json"))} \
        == before
    after = {c.key: c.status for c in ResultStore(run_dir / "results.sqlite",
                                                   readonly=True).cells()}
    assert {k: v for k, v in after.items() if k in store_before} == store_before


# cases 2, 3, 4, 8: publish trusts nothing in an entry -----------------------------------------
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c63f8cfc0f00f0004850180848c2e2100000000"
                    "49454e44ae426082")


def _entries_dir(tmp_path, **edit) -> Path:
    from leaderboard.entries import entry_digest, sample_entries, write_entry

    folder = tmp_path / "run" / "entries"
    for e in sample_entries()[:1]:
        e["defense"].update(edit.pop("defense", {}))
        e.update(edit)
        e["provenance"]["entry_sha256"] = entry_digest(e)
        write_entry(e, folder)
    return folder


def test_publish_copies_no_file_from_outside_the_entry_folder(tmp_path, capsys):
    secret = tmp_path / "secret.png"
    secret.write_bytes(PNG)
    folder = _entries_dir(tmp_path, figures=[
        {"title": "passwd", "path": "/etc/passwd"},
        {"title": "secret", "path": "../../secret.png"},
        {"title": "fake", "path": "fake.png"},
        {"title": "ok", "path": "figures/ok.png"}])
    (folder / "fake.png").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (folder / "figures").mkdir()
    (folder / "figures" / "ok.png").write_bytes(PNG)
    out = tmp_path / "site"
    with pytest.warns(UserWarning, match="not an image inside the entry's folder"):
        assert main(["publish", "--entries", str(folder), "--out", str(out),
                     "--format", "md,html"]) == 0
    copied = [p for p in (out / "plots" / "entries").iterdir()
              if "__attacks" not in p.name and "__security" not in p.name]
    assert [p.name.rsplit("__", 1)[-1] for p in copied] == ["ok.png"]
    assert all(b"root:" not in p.read_bytes() for p in (out / "plots").rglob("*") if p.is_file())


def test_publish_renders_no_script_and_no_javascript_link(tmp_path, capsys):
    folder = _entries_dir(tmp_path, defense={
        "label": "<script>alert(1)</script>", "authors": "<img src=x onerror=alert(2)>",
        "paper": "javascript:alert(1)//x"})
    out = tmp_path / "site"
    assert main(["publish", "--entries", str(folder), "--out", str(out), "--no-plots",
                 "--format", "md,html"]) == 0
    md = (out / "leaderboard.md").read_text()
    pages = "".join(p.read_text() for p in (out / "html").glob("*.html"))
    for text in (md, pages):
        assert "<script>alert" not in text and "<img src=x" not in text
        assert "javascript:" not in text.lower()
    assert "&lt;script&gt;" in md


def test_publish_out_is_path_checked(tmp_path, capsys):
    folder = _entries_dir(tmp_path)
    assert main(["publish", "--entries", str(folder), "--out", "/usr/lib", "--no-plots"]) == 2
    assert "system directory" in _last_line(capsys)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["publish", "--entries", str(folder), "--out", str(a_file), "--no-plots"]) == 2
    assert "not a directory" in _last_line(capsys)


def test_publish_refuses_a_tampered_entry_unless_unverified(tmp_path, capsys):
    folder = _entries_dir(tmp_path)
    path = next(folder.glob("*.json"))
    e = json.loads(path.read_text())
    e["worst_case"]["accuracy"] = 0.95  # hand-edited
    path.write_text(json.dumps(e))
    out = tmp_path / "site"
    assert main(["publish", "--entries", str(folder), "--out", str(out), "--no-plots"]) == 2
    assert "fails its integrity check" in _last_line(capsys)
    assert not (out / "leaderboard.md").exists()
    assert main(["publish", "--entries", str(folder), "--out", str(out), "--no-plots",
                 "--unverified", "--format", "md"]) == 0
    assert "(UNVERIFIED)" in (out / "leaderboard.md").read_text()


# case 12 (part): nonsense is refused ---------------------------------------------------------
def test_verify_refuses_a_negative_rerun(tmp_path, capsys):
    folder = _entries_dir(tmp_path)
    assert main(["verify", str(next(folder.glob("*.json"))), "--rerun", "-5"]) == 2
    assert "--rerun -5" in _last_line(capsys)


# case 9: bounded input -----------------------------------------------------------------------
@pytest.fixture
def alarm():
    """A hang (a FIFO opened for reading, /dev/zero read to the end) fails the test instead of
    hanging it."""
    def on_alarm(*_):
        raise TimeoutError("the command hung on its input")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_configs_are_read_only_from_regular_files_of_bounded_size(tmp_path, capsys, alarm):
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# " + b"x" * (2 << 20) + b"\nname: big\n")
    for path, words in [("/dev/zero", "is a device"), (str(fifo), "is a FIFO"),
                        (str(tmp_path), "is a folder"), (str(big), "more than a config")]:
        t0 = time.monotonic()
        assert main(["run", path, "--run-dir", str(tmp_path / "r")]) == 2
        assert time.monotonic() - t0 < 10
        line = _last_line(capsys)
        assert words in line and line.startswith("robustmatrix: error:"), line
    assert not (tmp_path / "r").exists()


SMALL = ("name: t\ndatasets: [{name: test_tiny, n: 10}]\ndefenses: [test_undefended]\n"
         "device: cpu\nbatch_size: 10\nfit_preset: tiny\n")


@pytest.mark.parametrize("attack, words", [
    ("{name: test_pgd, steps: 1000000000000}", "steps: must be between 1 and 100000"),
    ("{name: pgd, steps: -5}", "steps: must be between 1 and 100000, got -5"),
    ("{name: pgd, restarts: 0}", "restarts: must be between 1 and 1000"),
    ("{name: adaptive, inner_options: {steps: 1.0e+12}}", "inner_options.steps: must be between"),
    ("{name: pgd, steps: ten}", "steps: expected an integer"),
])
def test_numeric_attack_options_are_bounded(tmp_path, capsys, attack, words):
    path = tmp_path / "c.yaml"
    path.write_text(SMALL + f"attacks: [{attack}]\n")
    assert main(["run", str(path), "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 2
    line = _last_line(capsys)
    assert words in line, line


@pytest.mark.parametrize("argv, words", [
    (["fit", "test_pgd_at", "--option", "epochs=-3"], "epochs: must be between 1 and 10000"),
    (["fit", "test_pgd_at", "--option", "batch_size=0"], "batch_size: must be between 1"),
    (["run", "smoke", "--n", "0"], "n: must be between 1 and"),
    (["run", "smoke", "--batch-size", "-1"], "batch_size: must be between 1 and"),
    (["submit", "x.py:X", "--n", "10000000"], "--n: must be between 1 and"),
])
def test_numeric_flags_are_bounded(tmp_path, capsys, argv, words):
    assert main([*argv, "--run-dir", str(tmp_path / "r")] if argv[0] != "fit" else argv) == 2
    line = _last_line(capsys)
    assert words in line, line


# case 11: one line, never a traceback --------------------------------------------------------
def _damaged_copy(src: Path, dest: Path) -> Path:
    import shutil
    import sqlite3

    shutil.copytree(src, dest)
    db = dest / "results.sqlite"
    conn = sqlite3.connect(db)  # everything into the main file (no WAL left)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    data = bytearray(db.read_bytes())
    assert data[:16] == b"SQLite format 3\x00"
    page = int.from_bytes(data[16:18], "big")
    for i in range(page, len(data)):  # the header and the schema page intact, the rest garbage
        data[i] = 0x5A if i % 3 else 0xFF
    db.write_bytes(bytes(data))
    return dest


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    assert main(["run", "smoke", "--run-dir", str(run_dir), "--no-progress"]) == 0
    return run_dir


def test_a_store_damaged_mid_file_is_one_line_in_run_and_leaderboard(smoke_run, tmp_path,
                                                                      capsys):
    damaged = _damaged_copy(smoke_run, tmp_path / "damaged")
    capsys.readouterr()
    assert main(["leaderboard", "--run-dir", str(damaged)]) == 2
    line = _last_line(capsys)
    assert "result store is damaged" in line and "--run-dir" in line, line
    assert main(["run", "smoke", "--run-dir", str(damaged), "--no-progress"]) == 2
    line = _last_line(capsys)
    assert "damaged" in line or "cannot open the result store" in line, line


@pytest.mark.parametrize("argv, words", [
    (["run", "smoke", "--device", "cuda"], "CUDA is not available"),
    (["fit", "test_pgd_at", "--device", "cuda:7"], None),
    (["fit", "test_pgd_at", "--device", "tpu"], "expected auto, cpu, cuda"),
    (["fit", "test_pgd_at", "--option", "alpha=[1"], "not a valid YAML value"),
    (["fit", "test_pgd_at", "--option", "alpha=!!python/object/apply:os.getcwd []"],
     "!!python are not allowed"),
    (["submit", "examples/my_defense.py:BitDepthCNN", "--option", "bits={a: [}"],
     "not a valid YAML value"),
    (["submit", "examples/my_defense.py:BitDepthCNN", "--option",
      "bits=!!python/name:os.system"], "!!python are not allowed"),
    (["verify", "tests"], "is a folder; give the entry JSON file"),
])
def test_listed_tracebacks_are_one_line(tmp_path, capsys, argv, words):
    import torch

    if argv[-1] == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if argv[-1] == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    root = Path(__file__).resolve().parents[1]
    argv = [str(root / a) if a.startswith(("examples/", "tests")) else a for a in argv]
    extra = ["--run-dir", str(tmp_path / "r")] if argv[0] in ("run", "submit") else []
    assert main([*argv, *extra]) == 2
    line = _last_line(capsys)
    assert line.startswith("robustmatrix: error:"), line
    assert words is None or words in line, line


# case 12 (rest): nonsense configs are named as what they are ---------------------------------
@pytest.mark.parametrize("text, words", [
    ("", "the config is empty"), ("# only a comment\n", "the config is empty"),
    ("- a\n- b\n", "got a list"), ("just a string\n", "got a plain string")])
def test_empty_or_list_configs_are_named(tmp_path, capsys, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert main(["run", str(path), "--run-dir", str(tmp_path / "r")]) == 2
    line = _last_line(capsys)
    assert words in line and "__invalid__" not in line, line
    assert main(["run", "/dev/null", "--run-dir", str(tmp_path / "r")]) == 2
    assert "__invalid__" not in _last_line(capsys)


# case 6: fitted artifacts prove what they hold -----------------------------------------------
FIT = ["fit", "test_pgd_at", "--dataset", "test_tiny", "--preset", "tiny", "--device", "cpu"]
AT_RUN = ("name: at\ndatasets: [{name: test_tiny, n: 20}]\ndefenses: [test_pgd_at]\n"
          "attacks: [test_pgd]\ndevice: cpu\nbatch_size: 10\nfit_preset: tiny\nadaptive: false\n")


def _artifact(cache: Path) -> Path:
    (path,) = (cache / "artifacts" / "test_pgd_at").glob("*.safetensors")
    return path


def test_identical_fits_have_identical_artifact_sha256(tmp_path, monkeypatch, capsys):
    from bench.core.hashing import file_sha256

    shas = []
    for name in ("a", "b"):
        monkeypatch.setenv("ROBUSTMATRIX_CACHE", str(tmp_path / name))
        assert main(FIT) == 0
        shas.append(file_sha256(_artifact(tmp_path / name)))
    assert shas[0] == shas[1]
    head = _artifact(tmp_path / "a").read_bytes()
    n = int.from_bytes(head[:8], "little")
    header = json.loads(head[8:8 + n])
    assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(
        header["__metadata__"])
    assert len(header["__metadata__"]["content_sha256"]) == 64


def _clean_accuracy(run_dir: Path) -> float:
    records = json.loads((run_dir / "leaderboard" / "leaderboard.json").read_text())
    return records[0]["clean"]["accuracy"]


def test_a_corrupted_artifact_is_refitted_with_one_line(tmp_path, monkeypatch, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    monkeypatch.setenv("ROBUSTMATRIX_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "at.yaml"
    config.write_text(AT_RUN)
    assert main(["run", str(config), "--run-dir", str(tmp_path / "r1"), "--no-progress"]) == 0
    first = _clean_accuracy(tmp_path / "r1")
    path = _artifact(tmp_path / "cache")
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 2000, len(data) - 1000):  # weights overwritten, header intact
        data[i] = 0
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["run", str(config), "--run-dir", str(tmp_path / "r2"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "content hash" in ln]
    assert len(lines) == 1 and "refitting" in lines[0], err
    assert _clean_accuracy(tmp_path / "r2") == first  # the refit, not the damaged weights

    # an artifact from before content hashes: hashed once on load, then checked like any other
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "content_sha256"}
        state = {k: f.get_tensor(k) for k in f.keys()}
    save_file(state, str(path), metadata=meta)
    capsys.readouterr()
    assert main(["run", str(config), "--run-dir", str(tmp_path / "r3"), "--no-progress"]) == 0
    assert "recorded one now" in capsys.readouterr().err
    with safe_open(str(path), framework="pt") as f:
        assert "content_sha256" in f.metadata()
    assert _clean_accuracy(tmp_path / "r3") == first


@pytest.mark.parametrize("key", [("pgd_at", "cifar10", None, "standard"),
                                 ("spat", "imagenet10", 64, "standard")])
def test_the_shipped_artifacts_still_load_against_their_pins(key):
    """Shipped artifacts predate content hashes; they are pinned by the sha256 of their file
    (bench.artifacts.SHIPPED, the model cards) and load unchanged, without being rewritten."""
    from bench.artifacts import SHIPPED, prepare_defense
    from bench.core.hashing import file_sha256

    name, dataset, res, preset = key
    entry = SHIPPED[key]
    assert entry.sha256 in entry.path.with_suffix(".md").read_text()
    defense, info = prepare_defense(name, {}, dataset=dataset, preset=preset, device="cpu",
                                    dataset_options={"resolution": res} if res else {},
                                    log=pytest.fail)  # no "refitting", no "recorded one now"
    assert info["shipped"] and info["artifact_sha256"] == entry.sha256
    assert file_sha256(entry.path) == entry.sha256 and defense.fitted


# case 5: the decoded-dataset cache proves what it holds; cell keys hold the pixel hash ---------
def _cifar_tree(root: Path) -> None:
    import numpy as np
    from PIL import Image

    from bench.data.cifar10 import Cifar10

    rng = np.random.default_rng(0)
    for cls in Cifar10.folder_names:
        folder = root / "cifar10-jpeg" / "test" / cls
        folder.mkdir(parents=True, exist_ok=True)
        for p in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                folder / f"{p:04d}.png")


def _untrained_cifar_cnn(**_):
    """A fixed-seed untrained CNN for 32x32 images: a CIFAR-10 defense that needs no training
    data (test_undefended would train its classifier on the full train split)."""
    import torch
    from torch import nn

    from defenses.base import Defense

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 15 * 15, 10))
    return Defense(net, num_classes=10)


@pytest.fixture
def cifar_run(tmp_path, monkeypatch):
    from bench.core.registry import DEFENSES

    if "test_issue16_cifar_cnn" not in DEFENSES:
        DEFENSES.register("test_issue16_cifar_cnn", _untrained_cifar_cnn)
    _cifar_tree(tmp_path / "data")
    monkeypatch.setenv("ROBUSTMATRIX_CACHE", str(tmp_path / "cache"))
    argv = ["run", "smoke", "--dataset", "cifar10", "--data-root", str(tmp_path / "data"),
            "--defense", "test_issue16_cifar_cnn", "--attack", "test_pgd", "--threat",
            "linf=8/255", "--n", "20", "--run-dir", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 0
    (cache,) = (tmp_path / "cache" / "decoded").glob("cifar10-test-*.safetensors")
    return argv, cache, tmp_path / "run"


def _counts(capsys) -> str:
    return next(ln for ln in capsys.readouterr().err.splitlines() if "cells computed" in ln)


def _rewrite_cache(cache: Path, *, images=None, labels=None, drop_hash=False) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from bench.data.core import _write_cache

    with safe_open(str(cache), framework="pt") as f:
        meta = f.metadata()
        img, lab = f.get_tensor("images"), f.get_tensor("labels")
    img = img if images is None else images(img)
    lab = lab if labels is None else labels(lab)
    if drop_hash:  # as an older version wrote it
        save_file({"images": img, "labels": lab}, str(cache),
                  metadata={k: v for k, v in meta.items() if k != "content_sha256"})
    else:  # a forger who recomputes the content hash
        _write_cache(cache, img, lab, json.loads(meta["sample_ids"]), json.loads(meta["skipped"]))


def _trust_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "cannot be trusted" in r.getMessage()]


def test_a_modified_decoded_cache_is_decoded_again_with_one_line(cifar_run, capsys, caplog):
    argv, cache, _ = cifar_run
    data = bytearray(cache.read_bytes())
    for i in range(len(data) - 3000, len(data) - 100):  # pixels overwritten, header intact
        data[i] = 255
    cache.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(argv) == 0
    (line,) = _trust_warnings(caplog)
    assert "does not match its content hash" in line and "decoding the images again" in line
    assert _counts(capsys).startswith("robustmatrix: 0 cells computed")  # same pixels: reused


@pytest.mark.parametrize("edit, words", [
    ({"labels": lambda lab: lab * 0 + 10**9}, "labels are outside 0..9"),
    ({"drop_hash": True}, "carries no content hash"),
    ({"labels": lambda lab: lab[:-1]}, "do not match"),
])
def test_a_garbage_decoded_cache_is_decoded_again(cifar_run, capsys, caplog, edit, words):
    argv, cache, _ = cifar_run
    _rewrite_cache(cache, **edit)
    capsys.readouterr()
    assert main(argv) == 0
    (line,) = _trust_warnings(caplog)
    assert words in line, line
    assert _counts(capsys).startswith("robustmatrix: 0 cells computed")


def test_other_pixels_under_the_same_ids_are_other_cells(cifar_run, capsys, caplog):
    from bench.core.store import ResultStore

    argv, cache, run_dir = cifar_run
    _rewrite_cache(cache, images=lambda img: 255 - img)  # content hash recomputed: passes
    capsys.readouterr()
    assert main(argv) == 0
    assert not _trust_warnings(caplog)
    assert " 0 reused" in _counts(capsys)  # nothing stored under the old pixels was reused
    store = ResultStore(run_dir / "results.sqlite", readonly=True)
    clean = [c for c in store.cells() if c.attack == "clean"]
    assert len(clean) == 2 and clean[0].spec["data"] == clean[1].spec["data"]  # same ids
    assert clean[0].spec["pixels"] != clean[1].spec["pixels"]
    assert {c.provenance["pixels_sha256"] for c in clean} == {c.spec["pixels"] for c in clean}


def test_a_store_from_before_pixel_hashes_is_reused(tmp_path, monkeypatch, capsys):
    import bench.harness.runner as runner
    from bench.core.hashing import json_sha256

    argv = ["run", "smoke", "--run-dir", str(tmp_path / "run"), "--no-progress"]
    with monkeypatch.context() as m:  # the keys an earlier version wrote (no "pixels")
        m.setattr(runner, "_hash", lambda obj: json_sha256(
            {k: v for k, v in obj.items() if k != "pixels"} if isinstance(obj, dict) else obj))
        assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "stored before cell keys carried the pixel hash" in err
    assert "robustmatrix: 0 cells computed" in err


# case 7: verify checks the recorded sha256 of the source before importing it -----------------
@pytest.fixture(scope="module")
def example_entry(tmp_path_factory):
    root = tmp_path_factory.mktemp("example")
    src = root / "user" / "my_defense.py"
    src.parent.mkdir()
    src.write_text((Path(__file__).resolve().parents[1] / "examples" / "my_defense.py")
                   .read_text())
    run_dir = root / "run"
    assert main(["submit", f"{src}:BitDepthCNN", *SUBMIT, "--run-dir", str(run_dir)]) == 0
    (entry,) = (run_dir / "entries").glob("*.json")
    return entry


def test_verify_imports_no_code_whose_sha256_differs(example_entry, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(example_entry.parent.parent, run)
    entry = run / "entries" / example_entry.name
    marker = tmp_path / "imported"
    evil = tmp_path / "evil.py"
    evil.write_text(Path(json.loads(entry.read_text())["defense"]["source"]["path"]).read_text()
                    + f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    e = json.loads(entry.read_text())
    e["defense"]["source"]["path"] = str(evil)  # an edited entry: its digest is still intact
    entry.write_text(json.dumps(e))
    capsys.readouterr()
    assert main(["verify", str(entry), "--rerun", "0"]) == 1
    out = capsys.readouterr().out
    assert not marker.exists(), "verify imported code that is not the submitted code"
    assert "[ok] entry_integrity" in out and "[FAIL] source" in out and "not imported" in out
    assert "[ok] weights" in out  # the snapshot taken at submission was checked instead

    (run / json.loads(entry.read_text())["defense"]["source"]["snapshot"]).write_text(
        evil.read_text())  # the snapshot tampered with too: nothing to import
    assert main(["verify", str(entry), "--rerun", "0"]) == 1
    out = capsys.readouterr().out
    assert not marker.exists() and "nothing was imported" in out


# case 12 (rest): leaderboard on a read-only run directory ------------------------------------
def _read_only(run_dir: Path, argv: list[str]):
    """Run the CLI with ``run_dir`` read-only: a read-only bind mount in a private mount
    namespace as root (chmod does not stop root), chmod otherwise."""
    import shutil
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "bench", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if os.geteuid() != 0:
        os.chmod(run_dir, 0o555)
        try:
            return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        finally:
            os.chmod(run_dir, 0o755)
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to make a read-only mount as root")
    script = (f'mount --bind "{run_dir}" "{run_dir}" && mount -o remount,bind,ro "{run_dir}" '
              f'&& ! touch "{run_dir}/probe" 2>/dev/null && exec "$@"')
    res = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *cmd], capture_output=True,
                         text=True, env=env, timeout=120)
    if res.returncode != 0 and "mount" in res.stderr and "robustmatrix" not in res.stderr:
        pytest.skip(f"cannot make a read-only mount here ({res.stderr.strip()[:100]})")
    return res


def test_leaderboard_on_a_read_only_run_directory(smoke_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir)
    shutil.rmtree(run_dir / "leaderboard")
    res = _read_only(run_dir, ["leaderboard", "--run-dir", str(run_dir)])
    assert res.returncode == 0, res.stderr
    assert "| Rank" in res.stdout and "Traceback" not in res.stderr
    assert "read-only" in res.stderr.strip().splitlines()[-1] and "--out" in res.stderr
    assert not (run_dir / "leaderboard").exists()
    out = tmp_path / "tables"
    res = _read_only(run_dir, ["leaderboard", "--run-dir", str(run_dir), "--out", str(out)])
    assert res.returncode == 0, res.stderr
    assert (out / "leaderboard.md").is_file() and not (run_dir / "leaderboard").exists()


# verify's and sweep's re-runs of a submitted defense are isolated like submit ----------------
def test_verify_and_sweep_run_the_submitted_defense_in_a_sandbox(tmp_path, capsys):
    import tempfile

    marker = Path(tempfile.gettempdir()) / f"robustmatrix-sleep-later-{os.getuid()}"
    marker.unlink(missing_ok=True)
    run_dir = tmp_path / "run"
    assert main(["submit", f"{HOSTILE}:SleepsLater", *SUBMIT, "--run-dir", str(run_dir)]) == 0
    (entry,) = (run_dir / "entries").glob("*.json")
    before = entry.read_bytes()
    marker.write_text("")  # from now on its forward hangs
    try:
        for argv in (["verify", str(entry), "--rerun", "1"],
                     ["sweep", str(entry), "--eps", "0,8/255", "--no-progress"]):
            t0 = time.monotonic()
            assert main([*argv, "--time-limit", "15"]) == 2
            assert time.monotonic() - t0 < 60
            line = _last_line(capsys)
            assert line.startswith("robustmatrix: error:") and "did not finish within 15 s" in \
                line, line
    finally:
        marker.unlink(missing_ok=True)
    assert entry.read_bytes() == before  # the entry is intact


def test_a_misspelt_null_option_is_refused_not_dropped(tmp_path, capsys):
    """Registry.create drops a None only for a parameter the factory declares (its default
    wins); `stesp: null` used to vanish silently."""
    path = tmp_path / "c.yaml"
    path.write_text(SMALL + "attacks: [{name: pgd, stesp: null}]\n")
    assert main(["run", str(path), "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 2
    line = _last_line(capsys)
    assert "bad options for attack 'pgd'" in line and "stesp" in line, line
