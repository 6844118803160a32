"""Model cards for the trained artifacts that ship with the project (``defenses/weights``).

A card is Markdown beside its ``.safetensors``: what was trained (defense, dataset, config),
how (recipe, data, held-out check per epoch, wall time), what it measures (clean / PGD /
AutoAttack accuracy from a ``robustmatrix run`` leaderboard JSON, with 95% intervals), the code
version and the file's sha256 (the same sha256 that pins it in :data:`bench.artifacts.SHIPPED`).
Written by ``robustmatrix fit DEFENSE --preset standard --ship [--card-results RUN_DIR]``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench.core.hashing import file_sha256 as sha256_file


def shipped_filename(name: str, dataset: str, resolution: Any, preset: str) -> str:
    res = f"-{resolution}px" if resolution else ""
    return f"{name}-{dataset}{res}-{preset}.safetensors"


def code_version(root: Path | None = None) -> str:
    root = root or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        if out.returncode == 0:
            return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (not a git checkout)"


def measured_rows(run_dir: Path, defense_label: str | None = None) -> list[dict[str, Any]]:
    """Leaderboard records of ``run_dir`` (``leaderboard/leaderboard.json``), optionally only
    those of one defense label."""
    path = Path(run_dir) / "leaderboard" / "leaderboard.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `robustmatrix leaderboard "
                                f"--run-dir {run_dir}` first")
    records = json.loads(path.read_text())
    return [r for r in records if defense_label is None or r["defense"] == defense_label]


def _pct(acc: dict[str, Any]) -> str:
    return (f"{100 * acc['accuracy']:.1f} [{100 * acc['ci_low']:.1f}, "
            f"{100 * acc['ci_high']:.1f}]")


def _eps(threat: str, eps: float) -> str:
    return f"Linf {eps * 255:.3g}/255" if threat == "linf" else f"{threat.upper()} {eps:.3g}"


def _history_section(history: list[Any]) -> list[str]:
    """The per-epoch training history as a table: the adversarial-training columns when the
    entries have them, else one column per recorded value (e.g. an autoencoder's MSE)."""
    if not history:
        return []
    if all(isinstance(r, dict) and "epoch" in r and "loss" in r for r in history):
        lines = ["## Training history (held-out train images, PGD-10, fp32)", "",
                 "| epoch | loss | adv. train acc | held-out clean | held-out PGD | s |",
                 "|---|---|---|---|---|---|"]
        for r in history:
            mark = " (selected)" if r.get("selected") else ""
            lines.append(f"| {r['epoch']}{mark} | {r['loss']:.3f} | "
                         f"{r.get('adv_train_accuracy', float('nan')):.3f} | "
                         f"{r.get('val_clean', float('nan')):.3f} | "
                         f"{r.get('val_pgd', float('nan')):.3f} | {r.get('seconds', 0):.0f} |")
        return lines + [""]
    rows = [r if isinstance(r, dict) else {"value": r} for r in history]
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float))]

    def fmt(v: Any) -> str:
        return f"{v:.5g}" if isinstance(v, float) else str(v)

    lines = ["## Training history (per epoch, training loss terms)", "",
             "| epoch | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |")
    return lines + [""]


def render_card(*, name: str, dataset: str, resolution: Any, preset: str, sha256: str,
                meta: dict[str, str], fit_info: dict[str, Any] | None,
                measured: list[dict[str, Any]], source_runs: list[str]) -> str:
    config = json.loads(meta.get("config", "{}"))
    fit_info = fit_info or {}
    settings = fit_info.get("settings", config.get("settings", {}))
    lines = [f"# Model card: `{name}` on {dataset}"
             + (f" at {resolution} px" if resolution else "") + f" (`{preset}` scale)", ""]
    seconds = fit_info.get("seconds", 0)
    if isinstance(seconds, dict):  # per stage (e.g. SRD): the total, then the stages
        parts = ", ".join(f"{k} {float(v) / 60:.1f}" for k, v in seconds.items()
                          if isinstance(v, (int, float)))
        wall = (f"{sum(float(v) for v in seconds.values() if isinstance(v, (int, float))) / 60:.1f}"
                f" min ({parts})")
    else:
        wall = f"{float(seconds or 0) / 60:.1f} min"
    arch = config.get("arch") or config.get("architecture") or config.get("latent") or "?"
    lines += ["| | |", "|---|---|",
              f"| file | `{shipped_filename(name, dataset, resolution, preset)}` |",
              f"| sha256 | `{sha256}` |",
              f"| architecture | {arch} |",
              f"| method | {config.get('method', name)} |"]
    if "eps" in config:
        lines.append(f"| threat model trained for | Linf eps = "
                     f"{float(config.get('eps') or 0) * 255:.3g}/255 |")
    if config.get("classifier"):
        lines.append(f"| classifier | {config['classifier']} (sha256 "
                     f"`{str(config.get('classifier_sha256', '?'))[:16]}`) |")
    lines += [f"| initialisation | {fit_info.get('init') or config.get('init') or 'scratch'} |",
              f"| training data | {dataset} train split, {fit_info.get('train_images', '?')} "
              f"images"
              + (f" (+{settings['val_images']} held out for the per-epoch check)"
                 if settings.get("val_images") else "")
              + f"; fingerprint `{meta.get('train_fingerprint', '?')[:16]}` |",
              f"| wall time | {wall} |"]
    if "selected_epoch" in fit_info:
        lines.append(f"| selected epoch | {fit_info['selected_epoch']} of "
                     f"{settings.get('epochs', '?')} (best held-out PGD accuracy) |")
    if fit_info.get("calibration"):
        cal = json.dumps(fit_info["calibration"], sort_keys=True, default=str)
        lines.append(f"| detector calibration | `{cal}` |")
    lines += [f"| code version | {fit_info.get('code_version', 'unknown')} |", ""]
    recipe = settings or {k: config[k] for k in ("epochs", "lr", "batch_size") if k in config}
    lines += ["## Recipe", "", "```json", json.dumps(recipe, indent=1, sort_keys=True,
                                                     default=str), "```", ""]
    lines += _history_section(fit_info.get("history") or [])
    lines += measured_section(measured, source_runs)
    return "\n".join(lines) + "\n"


MEASURED_HEADING = "## Measured accuracy (test split, through `robustmatrix run`)"


def measured_section(measured: list[dict[str, Any]], source_runs: list[str]) -> list[str]:
    """The card's measured-accuracy section (lines), from leaderboard records."""
    lines = [MEASURED_HEADING, ""]
    if measured:
        lines += ["Accuracy in %, 95% Wilson intervals; worst case = per-sample AND over the "
                  "attacks in the row.", "",
                  "| dataset | threat | n | clean | attack | accuracy | worst case |",
                  "|---|---|---|---|---|---|---|"]
        for r in measured:
            for attack, acc in r["attacks"].items():
                lines.append(f"| {r.get('dataset', '?')} | {_eps(r['threat'], r['eps'])} | "
                             f"{r['n']} | {_pct(r['clean'])} | {attack} | {_pct(acc)} | "
                             f"{_pct(r['worst_case'])} |")
        lines += ["", "Runs: " + ", ".join(f"`{s}`" for s in source_runs), ""]
    else:
        lines += ["Not measured yet.", ""]
    return lines


def update_measured(card: Path, measured: list[dict[str, Any]], source_runs: list[str]) -> None:
    """Replace the measured-accuracy section of an existing model card (the rest, written by
    the fit, stays as it is)."""
    text = Path(card).read_text()
    head = text.split(MEASURED_HEADING)[0].rstrip("\n") + "\n\n"
    Path(card).write_text(head + "\n".join(measured_section(measured, source_runs)) + "\n")


def ship(artifact: Path, *, name: str, dataset: str, resolution: Any, preset: str,
         dest_dir: Path, measured: list[dict[str, Any]], source_runs: list[str],
         fit_info: dict[str, Any] | None = None) -> Path:
    """Copy ``artifact`` into ``dest_dir`` under its shipped name and write its model card
    (``fit_info``: default, the ``.fit.json`` written beside the artifact by its fit).
    Returns the copied file; its sha256 is the pin to put in ``SHIPPED``."""
    from safetensors import safe_open

    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / shipped_filename(name, dataset, resolution, preset)
    card = dest.with_suffix(".md")
    if dest.exists() and Path(artifact).resolve() == dest.resolve():
        # the artifact IS the shipped file (the harness loaded the pinned one): keep the card
        # the fit wrote and refresh only its measured section
        if card.is_file() and MEASURED_HEADING in card.read_text():
            update_measured(card, measured, source_runs)
            return dest
    else:
        shutil.copyfile(artifact, dest)
    with safe_open(str(dest), framework="pt") as f:
        meta = dict(f.metadata() or {})
    side = artifact.with_name(artifact.stem + ".fit.json")
    if fit_info is None and side.is_file():
        fit_info = json.loads(side.read_text())
    sha = sha256_file(dest)
    dest.with_suffix(".md").write_text(render_card(
        name=name, dataset=dataset, resolution=resolution, preset=preset, sha256=sha, meta=meta,
        fit_info=fit_info, measured=measured, source_runs=source_runs))
    return dest
