"""Submitting a defense from a file OUTSIDE the repository, its contract checks, and verifying
its entry (hand-edited, changed weights, changed adversarials and changed code are caught).

One submission (the worked example of docs/submitting.md, on test_tiny, n=20, the 3-step PGD
suite) is shared by the module; each tamper test works on a copy of its run folder.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bench.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "my_defense.py"
SUBMIT = ["--dataset", "test_tiny", "--n", "20", "--suite", "test", "--fit-preset", "tiny",
          "--device", "cpu", "--no-progress"]


ONE_PIXEL_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
                 "AAAABJRU5ErkJggg==")


def outside_repo(path: Path) -> Path:
    path = path.resolve()
    assert REPO not in path.parents, f"{path} must lie outside the repository"
    return path


@pytest.fixture(scope="module")
def submitted(tmp_path_factory):
    user = outside_repo(tmp_path_factory.mktemp("user_code"))
    src = user / "my_defense.py"
    shutil.copyfile(EXAMPLE, src)
    tsne = user / "tsne_latent.png"  # a figure the defense's author provides
    tsne.write_bytes(base64.b64decode(ONE_PIXEL_PNG))
    run_dir = tmp_path_factory.mktemp("submission") / "run"
    code = main(["submit", f"{src}:BitDepthCNN", *SUBMIT, "--name", "Bit-depth CNN",
                 "--authors", "A. User", "--paper", "https://example.org/bitdepth",
                 "--architecture", "SmallCNN", "--run-dir", str(run_dir), "--figure", str(tsne)])
    assert code == 0
    entries = sorted((run_dir / "entries").glob("*.json"))
    assert len(entries) == 1
    return SimpleNamespace(src=src, run_dir=run_dir, entry=entries[0],
                           data=json.loads(entries[0].read_text()))


def copy_run(submitted, tmp_path) -> Path:
    """A private copy of the run folder; returns its entry path."""
    dest = tmp_path / "run"
    shutil.copytree(submitted.run_dir, dest)
    return dest / "entries" / submitted.entry.name


# the submission --------------------------------------------------------------------------------
def test_entry_has_metadata_numbers_cost_and_provenance(submitted):
    e = submitted.data
    d = e["defense"]
    assert (d["label"], d["authors"], d["paper"], d["architecture"], d["extra_data"]) == (
        "Bit-depth CNN", "A. User", "https://example.org/bitdepth", "SmallCNN", False)
    assert d["source"]["kind"] == "file" and d["source"]["path"] == str(submitted.src)
    assert d["structure"]["has_preprocessor"] and not d["structure"]["preprocessor_differentiable"]
    assert (e["dataset"], e["threat"], e["n"]) == ("test_tiny", "linf", 20)
    assert e["eps"] == pytest.approx(8 / 255)
    for acc in [e["clean"], e["worst_case"], *e["attacks"].values()]:
        assert acc["ci_low"] <= acc["accuracy"] <= acc["ci_high"] and acc["n"] == 20
    assert "test_pgd" in e["attacks"]
    assert e["worst_case"]["accuracy"] <= min(a["accuracy"] for a in e["attacks"].values())
    assert e["cost"]["forward_passes"] > 0 and e["cost"]["total_wall_time"] > 0
    p = e["provenance"]
    for key in ("code_version", "checkpoint_sha256", "config_hash", "seed", "device", "date",
                "sample_ids_sha256", "data_fingerprint", "entry_sha256"):
        assert p[key] not in (None, ""), key
    assert len(p["sample_ids"]) == 20
    batches = e["attacks"]["test_pgd"]["batches"]
    assert batches and all(len(b["sha256"]) == 64 for b in batches)
    assert (submitted.run_dir / d["artifact_snapshot"]).is_file()
    assert e["validation"]["passed"]


def test_verify_confirms_a_fresh_entry(submitted, capsys):
    assert main(["verify", str(submitted.entry), "--rerun", "1"]) == 0
    out = capsys.readouterr().out
    assert "verdict: VERIFIED" in out
    for check in ("entry_integrity", "store_agreement", "adversarials", "weights", "config",
                  "data", "rescore", "rerun"):
        assert f"[ok] {check}" in out


def test_published_in_every_format(submitted, tmp_path, capsys):
    out = tmp_path / "site"
    assert main(["publish", "--entries", str(submitted.run_dir), "--out", str(out)]) == 0
    for f in ("leaderboard.md", "entries.csv", "leaderboard.json", "leaderboard.tex",
              "html/index.html", "html/test_tiny_linf.html"):
        assert "Bit-depth CNN" in (out / f).read_text(), f
    assert list((out / "plots").glob("*.png")) and list((out / "plots").glob("*.svg"))
    assert "tsne_latent (provided by the defense)" in (out / "html/test_tiny_linf.html").read_text()


# verify catches tampering ----------------------------------------------------------------------
def _failed(path, **kw):
    from bench.harness.submission.verify import verify_entry

    rep = verify_entry(path, rerun=0, log=lambda m: None, **kw)
    return rep, {c.name for c in rep.checks if not c.ok}


def test_verify_catches_a_hand_edited_accuracy(submitted, tmp_path, capsys):
    from leaderboard.table import wilson_interval

    entry = copy_run(submitted, tmp_path)
    e = json.loads(entry.read_text())
    real = e["worst_case"]["accuracy"]
    naive = dict(e, worst_case={**e["worst_case"], "accuracy": real + 0.3 if real < 0.6
                                else real - 0.3})  # the number only
    entry.write_text(json.dumps(naive))
    assert "entry_integrity" in _failed(entry)[1]
    # a careful forger keeps counts and interval consistent: the store and re-scoring disagree
    k = 10 if e["worst_case"]["k"] > 14 else 20
    lo, hi = wilson_interval(k, 20)
    forged = dict(e, worst_case={"accuracy": k / 20, "ci_low": lo, "ci_high": hi, "k": k, "n": 20})
    entry.write_text(json.dumps(forged))
    _, failed = _failed(entry)
    assert {"entry_integrity", "store_agreement", "rescore"} <= failed
    assert main(["verify", str(entry), "--rerun", "0"]) == 1
    assert "verdict: FAILED" in capsys.readouterr().out


def test_verify_catches_changed_weights(submitted, tmp_path):
    from safetensors.torch import load_file, save_file

    entry = copy_run(submitted, tmp_path)
    e = json.loads(entry.read_text())
    art = entry.parent.parent / e["defense"]["artifact_snapshot"]
    state = load_file(str(art))
    key = next(k for k in state if k.endswith("weight") and state[k].ndim == 4)
    state[key] = state[key] + 0.05 * torch.randn_like(state[key])
    save_file(state, str(art))
    rep, failed = _failed(entry)
    assert "weights" in failed
    assert "stale entry" in rep.get("weights").detail


def test_verify_catches_changed_adversarials(submitted, tmp_path):
    from safetensors.torch import load_file, save_file

    entry = copy_run(submitted, tmp_path)
    e = json.loads(entry.read_text())
    batch = e["attacks"]["test_pgd"]["batches"][0]
    path = entry.parent.parent / batch["path"]
    adv = load_file(str(path))["adv"]
    save_file({"adv": (adv + 1 / 255).clamp(0, 1)}, str(path))
    rep, failed = _failed(entry)
    assert failed == {"adversarials"} or "adversarials" in failed
    assert "sha256" in rep.get("adversarials").detail


def test_verify_catches_changed_defense_code(submitted, tmp_path):
    entry = copy_run(submitted, tmp_path)
    e = json.loads(entry.read_text())
    edited = outside_repo(tmp_path) / "my_defense_v2.py"
    edited.write_text(submitted.src.read_text().replace("bits: int = 4", "bits: int = 3"))
    e["defense"]["source"]["path"] = str(edited)  # the user edited their file in place
    entry.write_text(json.dumps(e))
    rep, failed = _failed(entry)
    # issue 16 case 7: the changed file is not imported (its sha256 is checked first); the
    # snapshot taken at submission is verified instead and the source check fails
    assert "source" in failed and rep.get("weights").data["source_changed"]
    assert "was not imported" in rep.get("source").detail


# contract checks -------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _defense(forward=None, *, random=False, preprocessor=None, train_override=False):
    from defenses.base import Defense

    cls_attrs = {"random": random}
    if forward is not None:
        cls_attrs["forward"] = forward
    if train_override:
        cls_attrs["train"] = lambda self, mode=True: self  # never leaves training mode
    cls = type("Candidate", (Defense,), cls_attrs)
    d = cls(Tiny(), preprocessor=preprocessor, num_classes=10)
    if train_override:
        nn.Module.train(d, True)
    return d


class Rounding(nn.Module):
    def forward(self, x):
        return torch.round(x * 7) / 7


def _nondiff_declared():
    from defenses.base import Preprocessor

    class Round(Preprocessor):
        differentiable = False

        def forward(self, x):
            return torch.round(x * 7) / 7

    return _defense(preprocessor=Round())


CONTRACT_CASES = {
    # name: (defense factory, check, severity expected)
    "probabilities": (lambda: _defense(lambda self, x: self.classifier(x).softmax(1)),
                      "logits", "error"),
    "wrong shape": (lambda: _defense(lambda self, x: self.classifier(x)[:, :5]), "output", "fatal"),
    "NaN": (lambda: _defense(lambda self, x: self.classifier(x) * torch.log(x.mean() - 2)),
            "output", "fatal"),
    "NaN on black images": (lambda: _defense(lambda self, x: self.classifier(x / x.amax((1, 2, 3),
                                                                               keepdim=True))),
                            "output", "fatal"),
    "undeclared randomness": (lambda: _defense(lambda self, x: self.classifier(
        x + 0.05 * torch.randn_like(x))), "randomness", "error"),
    "training mode in forward": (lambda: _defense(lambda self, x: self.classifier.train()(x)),
                                 "eval_mode", "error"),
    "train() overridden": (lambda: _defense(train_override=True), "eval_mode", "error"),
    "undeclared non-differentiable step": (lambda: _defense(lambda self, x: self.classifier(
        Rounding()(x))), "gradients", "error"),
    "no gradient at all": (lambda: _defense(lambda self, x: self.classifier(x).detach()),
                           "gradients", "error"),
    "declared random but deterministic": (lambda: _defense(random=True), "randomness", "warning"),
}


@pytest.fixture(scope="module")
def probe():
    from bench.data import load_eval

    data = load_eval("test_tiny", 20)
    return data.images, data.labels


@pytest.mark.parametrize("case", list(CONTRACT_CASES), ids=list(CONTRACT_CASES))
def test_contract_violations_are_named_with_their_fix(case, probe):
    from bench.harness.validate import validate_defense

    factory, check, severity = CONTRACT_CASES[case]
    rep = validate_defense(factory(), *probe, num_classes=10)
    hits = [f for f in rep.findings if f.check == check and f.severity == severity]
    assert hits, rep.format()
    if severity in ("fatal", "error"):
        assert not rep.ok and hits[0].fix
        assert rep.refusal().startswith(f"submission refused: {check}:")
        assert "Fix:" in rep.refusal()


def test_honest_defenses_pass(probe):
    from bench.harness.validate import validate_defense

    for d in (_defense(), _nondiff_declared()):
        rep = validate_defense(d, *probe, num_classes=10)
        assert rep.ok, rep.format()
        assert not rep.of("warning") or all(f.check == "inputs" for f in rep.of("warning"))


BAD_FILE = '''
import torch
from torch import nn
from defenses.base import Defense


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 16 * 16, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


class Softmaxed(Defense):
    """Returns probabilities (a classic contract violation)."""

    def __init__(self, dataset="test_tiny"):
        super().__init__(Net(), num_classes=10)

    def forward(self, x):
        return self.classifier(x).softmax(1)
'''


def test_cli_refuses_a_broken_contract_with_one_line(tmp_path, capsys):
    src = outside_repo(tmp_path) / "bad_defense.py"
    src.write_text(BAD_FILE)
    run_dir = tmp_path / "run"
    code = main(["submit", f"{src}:Softmaxed", *SUBMIT, "--n", "10", "--run-dir", str(run_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("robustmatrix: error: submission refused: logits:")
    assert "probabilities" in err[-1] and "Fix: return the logits" in err[-1]
    assert "--force" in err[-1] and "Traceback" not in "\n".join(err)
    assert not (run_dir / "results.sqlite").exists()  # refused before any attack ran

    # --force records it as a flag on the entry instead
    assert main(["submit", f"{src}:Softmaxed", *SUBMIT, "--n", "10", "--run-dir", str(run_dir),
                 "--force"]) == 0
    e = json.loads(next((run_dir / "entries").glob("*.json")).read_text())
    assert "contract_logits" in {f["code"] for f in e["flags"]}


def test_cli_errors_for_missing_file_and_class(tmp_path, capsys):
    src = outside_repo(tmp_path) / "bad_defense.py"
    src.write_text(BAD_FILE)
    assert main(["submit", f"{tmp_path}/nope.py:X", *SUBMIT]) == 2
    assert "no file" in capsys.readouterr().err
    assert main(["submit", f"{src}:Softmaxd", *SUBMIT]) == 2
    assert "did you mean 'Softmaxed'" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow
def test_sweep_adds_a_curve_to_the_entry(submitted, tmp_path):
    entry = copy_run(submitted, tmp_path)
    assert main(["sweep", str(entry), "--eps", "0,8/255,32/255", "--attack", "adaptive",
                 "--option", "inner=test_pgd", "--no-progress"]) == 0
    e = json.loads(entry.read_text())
    pts = e["sweep"]["points"]
    assert [round(p["eps"] * 255) for p in pts] == [0, 8, 32]
    assert pts[0]["worst_case"]["accuracy"] == e["clean"]["accuracy"]
