"""The per-row evaluation checklist (leaderboard/checklist.py): folding flags and check records,
the Markdown column, and, through the CLI a user takes, a submission of the bundled example
defense declared correctly (BPDA) and mis-declared (no BPDA: masked gradients)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.cli import main
from leaderboard.checklist import ITEMS, build_checklist, compact, legend

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "my_defense.py"


def _by(checklist):
    return {c["check"]: c for c in checklist}


def test_every_item_is_reported_and_flags_fail_their_item():
    recs = [{"code": "binarization", "status": "pass", "seen": "ok", "points": [1, 1, None],
             "pass_rate": 1.0, "min_pass_rate": 0.9, "attack": "pgd"},
            {"code": "binarization", "status": "fail", "seen": "weak", "points": [0, 0, None],
             "pass_rate": 0.0, "min_pass_rate": 0.9, "attack": "fgsm"},
            {"code": "unstable_predictions", "status": "pass", "seen": "flat"}]
    cl = _by(build_checklist([], recs))
    assert len(cl) == len(ITEMS) + 1
    assert cl["binarization"]["status"] == "pass"  # the SUITE found every known adversarial
    assert cl["unstable_predictions"]["status"] == "pass"
    assert cl["silent_success"]["status"] == "n/a"  # no record: not run, never a silent pass
    flags = [{"code": "unbounded_attack_fails", "seen": "broke 50%"},
             {"code": "randomness", "seen": "differ"}]
    cl = _by(build_checklist(flags, [{"code": "unconstrained_attack", "status": "pass",
                                      "seen": "x"}]))
    assert cl["unconstrained_failure"]["status"] == "fail"
    assert cl["other_flags"]["status"] == "fail" and "randomness" in cl["other_flags"]["seen"]
    weak = [dict(recs[1])]
    assert _by(build_checklist([], weak))["binarization"]["status"] == "fail"
    # a transfer attack rescues the suite, but the white-box attack alone misses: fail
    rescued = [{**recs[1], "kind": "white-box"},
               {**recs[0], "attack": "transfer pgd", "kind": "transfer"}]
    got = _by(build_checklist([], rescued))["binarization"]
    assert got["status"] == "fail" and "white-box attacks 0%" in got["seen"], got
    both = rescued + [{**recs[0], "attack": "bpda+pgd", "kind": "white-box"}]
    assert _by(build_checklist([], both))["binarization"]["status"] == "pass"


def test_compact_column_and_legend():
    cl = build_checklist([{"code": "silent_success", "seen": "3"}],
                         [{"code": "silent_success", "status": "pass", "seen": "-"}])
    text = compact(cl)
    assert text.startswith("✓") and "✗ SIL" in text
    assert compact(None) == "-"
    assert all(short in legend() for _, short, *_ in ITEMS)


@pytest.fixture(scope="module")
def submitted(tmp_path_factory):
    """The example declared as it ships (BPDA) and mis-declared differentiable (no BPDA)."""
    user = tmp_path_factory.mktemp("user_code")
    good, bad = user / "my_defense.py", user / "masked_defense.py"
    shutil.copyfile(EXAMPLE, good)
    src = EXAMPLE.read_text()
    assert "    differentiable = False" in src
    bad.write_text(src.replace("    differentiable = False", "    differentiable = True"))
    runs = tmp_path_factory.mktemp("runs")
    out = {}
    for name, path in (("bpda", good), ("masked", bad)):
        code = main(["submit", f"{path}:BitDepthCNN", "--dataset", "test_tiny", "--n", "20",
                     "--suite", "test", "--attack", "pgd", "--fit-preset", "tiny", "--device",
                     "cpu", "--no-progress", "--name", f"Bit-depth CNN {name}", "--run-dir",
                     str(runs / name)] + (["--force"] if name == "masked" else []))
        assert code == 0
        (entry,) = sorted((runs / name / "entries").glob("*.json"))
        out[name] = json.loads(entry.read_text())
    out["runs"] = runs
    return out


def test_masked_gradients_fail_binarization_and_bpda_passes(submitted):
    masked, bpda = _by(submitted["masked"]["checklist"]), _by(submitted["bpda"]["checklist"])
    assert masked["binarization"]["status"] == "fail", masked["binarization"]
    assert masked["unavailable_gradients"]["status"] == "fail"
    # plain PGD is stuck at its random start (zero gradients through the rounding); BPDA+PGD
    # finds the known adversarial on (nearly) every task, so the BPDA row passes
    rates = bpda["binarization"]["pass_rates"]
    assert masked["binarization"]["pass_rates"]["pgd"] == 0 and rates["pgd"] == 0, (masked, rates)
    assert rates["bpda+pgd"] >= 0.9 and bpda["binarization"]["status"] == "pass", bpda
    assert bpda["unavailable_gradients"]["status"] == "pass"
    assert "BPDA" in bpda["unavailable_gradients"]["seen"]
    for c in submitted["bpda"]["checklist"]:
        assert c["status"] in ("pass", "fail", "n/a") and c["seen"]


def test_checklist_in_markdown_json_and_html_panel(submitted, tmp_path):
    out = tmp_path / "site"
    assert main(["publish", "--entries", str(submitted["runs"]), "--out", str(out)]) == 0
    md = next(out.rglob("*.md")).read_text()
    assert "| Checklist" in md or "Checklist |" in md
    assert "✗" in md and "BIN Binarization test" in md  # the column and its legend
    js = json.loads(next(p for p in out.rglob("*.json") if "leaderboard" in p.name
                         or p.parent.name == "json").read_text()) if list(out.rglob("*.json")) \
        else None
    assert js is not None and "checklist" in json.dumps(js)
    html = (out / "html" / "test_tiny_linf.html").read_text()
    assert html.count('class="small checklist"') == 2
    assert html.count('alt="security evaluation curve') == 2


def test_checklist_panel_in_chromium(submitted, tmp_path):
    from test_html import CHROMIUM, DevTools

    if CHROMIUM is None:
        pytest.skip("chromium is not installed")
    out = tmp_path / "site"
    assert main(["publish", "--entries", str(submitted["runs"]), "--out", str(out),
                 "--format", "html"]) == 0
    browser = DevTools(tmp_path / "profile")
    try:
        browser.open((out / "html" / "test_tiny_linf.html").as_uri())
        sel = "tbody[data-defense='Bit-depth CNN masked']"
        assert browser.js(f"document.querySelector(\"{sel} tr.details\").hidden") is True
        browser.click(f"{sel} button.toggle")
        assert browser.js(f"document.querySelector(\"{sel} tr.details\").hidden") is False
        status = browser.js(f"document.querySelector(\"{sel} table.checklist "
                            "tr[data-check='binarization']\").dataset.status")
        assert status == "fail"
        text = browser.js(f"document.querySelector(\"{sel} table.checklist\").innerText")
        assert "Binarization test" in text and "✗ failed" in text
        other = "tbody[data-defense='Bit-depth CNN bpda']"
        assert browser.js(f"document.querySelector(\"{other} table.checklist "
                          "tr[data-check='unavailable_gradients']\").dataset.status") == "pass"
        assert browser.js(f"document.querySelector(\"{sel} img.security\").naturalWidth") > 0
    finally:
        browser.close()


def test_leaderboard_prints_the_run_checklist(submitted, tmp_path, capsys):
    """`robustmatrix leaderboard --checklist`: a run's rows side by side (what docs/results.md
    shows for the seed defenses)."""
    run = submitted["runs"] / "masked"
    assert main(["leaderboard", "--run-dir", str(run), "--checklist", "--out",
                 str(tmp_path / "lb")]) == 0
    text = (tmp_path / "lb" / "checklist.md").read_text()
    assert text in capsys.readouterr().out
    lines = {ln.split(" | ")[0][2:6]: ln for ln in text.splitlines() if ln.startswith("| ")}
    assert "Bit-depth CNN masked" in text and "✗ white-box attacks 0%" in lines["BIN "]
    assert lines["GRD "].count("✗") == 1
