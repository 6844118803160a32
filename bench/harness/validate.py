"""Contract checks for a submitted defense, run BEFORE any attack (``robustmatrix submit``).

A defense that breaks the contract (``defenses/base.py``) makes every number computed on it
meaningless: probabilities instead of logits starve gradient attacks, undeclared randomness
skips EOT, a model left in training mode scores a batch rather than an image. Each check
below produces a :class:`Finding` that names the problem AND the fix:

* ``inputs``: the defense accepts float32 images in [0, 1] of shape (N, C, H, W), including the
  extremes (all black, all white), and is not at chance level on clean data;
* ``output``: a tensor of shape (N, num_classes), finite everywhere;
* ``logits``: the output is not a probability vector (rows in [0, 1] summing to 1);
* ``eval_mode``: ``.eval()`` reaches every sub-module, ``forward`` does not switch them back to
  training mode nor update buffers (BatchNorm statistics), and an image's output does not
  depend on the other images in its batch;
* ``randomness``: observed randomness (passes under different seeds) matches the declaration;
* ``gradients``: input gradients exist and are non-zero, or a non-differentiable preprocessor
  is declared (then the harness attacks with BPDA).

Severity: ``fatal`` (cannot be evaluated at all: refused even with ``--force``), ``error``
(refused unless ``--force``; then stored as a flag on the entry), ``warning`` (flagged on the
entry) and ``info`` (reported only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from bench.core.hashing import state_dict_sha256
from bench.harness import checks

SEVERITIES = ("fatal", "error", "warning", "info")

#: check -> (title shown in the leaderboard, one-line explanation of why it matters)
CHECK_TITLES = {
    "inputs": "Inputs in [0, 1]",
    "output": "Output shape and values",
    "logits": "Logits, not probabilities",
    "eval_mode": "Evaluation mode",
    "randomness": "Declared randomness",
    "gradients": "Input gradients",
    "structure": "Declared structure",
}


@dataclass
class Finding:
    """One result of one check; ``problem`` and ``fix`` are full sentences for a user."""

    check: str
    severity: str
    problem: str
    fix: str = ""

    def as_flag(self) -> dict[str, Any]:
        """The leaderboard flag dict (code, title, seen, try), like :mod:`bench.harness.flags`."""
        return {"code": f"contract_{self.check}", "title": CHECK_TITLES.get(self.check, self.check),
                "seen": self.problem, "try": self.fix, "source": "validation",
                "severity": self.severity}

    def line(self) -> str:
        return f"[{self.severity}] {self.check}: {self.problem}" + (
            f" Fix: {self.fix}" if self.fix else "")


@dataclass
class ValidationReport:
    findings: list[Finding] = field(default_factory=list)
    observed: dict[str, Any] = field(default_factory=dict)

    def add(self, check: str, severity: str, problem: str, fix: str = "") -> None:
        assert severity in SEVERITIES, severity
        self.findings.append(Finding(check, severity, problem, fix))

    def of(self, *severities: str) -> list[Finding]:
        return [f for f in self.findings if f.severity in severities]

    @property
    def ok(self) -> bool:
        """True when nothing refuses the submission (warnings become flags)."""
        return not self.of("fatal", "error")

    def flags(self, *, forced: bool = False) -> list[dict[str, Any]]:
        """Flags stored with the entry: warnings, plus the forced-through errors."""
        keep = ("warning", "error") if forced else ("warning",)
        return [f.as_flag() for f in self.findings if f.severity in keep]

    def format(self) -> str:
        if not self.findings:
            return "contract checks: all passed"
        return "contract checks:\n" + "\n".join("  " + f.line() for f in self.findings)

    def refusal(self, *, forced: bool = False) -> str | None:
        """One line naming the first blocking problem and its fix, or None."""
        blocking = self.of("fatal") if forced else self.of("fatal", "error")
        if not blocking:
            return None
        first = blocking[0]
        more = (f" (and {len(blocking) - 1} more problem(s), listed above)"
                if len(blocking) > 1 else "")
        hint = "" if forced or first.severity == "fatal" else (
            "; or pass --force to record it as a flag on the entry")
        return (f"submission refused: {first.check}: {first.problem} Fix: {first.fix}"
                f"{more}{hint}")

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.ok, "findings": [asdict(f) for f in self.findings],
                "observed": self.observed}


class ValidationError(ValueError):
    """A submission refused by its contract checks; ``str()`` is one line with the fix."""

    def __init__(self, message: str, report: ValidationReport) -> None:
        super().__init__(message)
        self.report = report


# helpers ------------------------------------------------------------------------------------
def _state_fingerprint(module: nn.Module) -> str:
    return state_dict_sha256(module)


def _training_modules(module: nn.Module) -> list[str]:
    return [name or type(module).__name__ for name, m in module.named_modules() if m.training]


def _declared(defense: nn.Module) -> dict[str, Any]:
    s = getattr(defense, "structure", None)
    if s is None:
        return {"random": bool(getattr(defense, "random", False)), "non_differentiable": False,
                "has_preprocessor": False}
    return {"random": bool(s.random), "non_differentiable": bool(
        s.has_preprocessor and not s.preprocessor_differentiable),
        "has_preprocessor": bool(s.has_preprocessor)}


def _forward(defense: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        return defense(x)


# the checks ---------------------------------------------------------------------------------
def validate_defense(defense: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                     num_classes: int, seed: int = 0, n: int = 32) -> ValidationReport:
    """Run every contract check on ``n`` clean images (already on the defense's device).

    The defense is put in eval mode first (as the harness does); checks stop at the first
    fatal problem, since the later ones need a usable output.
    """
    rep = ValidationReport()
    x, y = images[:n], labels[:n]
    declared = _declared(defense)
    rep.observed["declared"] = declared

    if not isinstance(defense, nn.Module):
        rep.add("structure", "fatal", f"the submission is a {type(defense).__name__}, not a "
                "torch.nn.Module.", "subclass defenses.base.Defense (or torch.nn.Module) and "
                "implement forward(images) -> logits.")
        return rep
    if getattr(defense, "structure", None) is None:
        rep.add("structure", "info", "the class is a plain nn.Module, not a Defense: it is "
                "evaluated as a deterministic, differentiable classifier with no preprocessor "
                "or detector.", "subclass defenses.base.Defense to declare a preprocessor, a "
                "detector or randomness.")

    # eval mode reaches everything ---------------------------------------------------------
    defense.eval()
    still = _training_modules(defense)
    if still:
        rep.add("eval_mode", "error", f"after .eval() these modules are still in training mode: "
                f"{', '.join(still[:5])}.", "do not override train()/eval(); let "
                "nn.Module.eval() reach every sub-module.")
        defense.eval()

    # inputs in [0, 1] are accepted ---------------------------------------------------------
    state_before = _state_fingerprint(defense)
    try:
        out = _forward(defense, x, seed)
    except Exception as exc:  # noqa: BLE001 - any failure is the submitter's to fix
        rep.add("inputs", "fatal", f"forward on float32 images in [0, 1] of shape "
                f"{tuple(x.shape)} raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                "accept float32 (N, C, H, W) images in [0, 1] and normalise inside the model.")
        return rep
    if not isinstance(out, torch.Tensor):
        rep.add("output", "fatal", f"forward returned a {type(out).__name__}, not a tensor.",
                "return one tensor of logits of shape (N, num_classes).")
        return rep
    expected = (len(x), num_classes)
    if tuple(out.shape) != expected:
        rep.add("output", "fatal", f"forward returned shape {tuple(out.shape)} for {len(x)} "
                f"images; expected {expected}.", "return one row of num_classes logits per image "
                "(no extra dimensions, no reject class: a detector goes in Defense.detector).")
        return rep
    if not out.is_floating_point():
        rep.add("output", "fatal", f"forward returned dtype {out.dtype}, not floating point "
                "(class indices?).", "return float logits of shape (N, num_classes).")
        return rep
    bad_rows = int((~torch.isfinite(out)).any(1).sum())
    if bad_rows:
        rep.add("output", "fatal", f"{bad_rows}/{len(out)} output rows contain NaN or inf on "
                "clean images.", "guard divisions and logarithms (add an epsilon, clamp); every "
                "logit must be finite.")
        return rep
    c, h, w = x.shape[1:]
    extremes = torch.stack([torch.zeros(c, h, w), torch.ones(c, h, w)]).to(x.device, x.dtype)
    try:
        ext = _forward(defense, extremes, seed)
        if not torch.isfinite(ext).all():
            rep.add("output", "fatal", "the output contains NaN or inf on an all-black or "
                    "all-white image (a valid input in [0, 1]).", "guard divisions and logarithms "
                    "(e.g. log(x + 1e-6), std + 1e-6) so every input in [0, 1] gives finite "
                    "logits.")
            return rep
    except Exception as exc:  # noqa: BLE001
        rep.add("inputs", "fatal", f"forward on an all-black / all-white image raised "
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", "accept every input "
                "in [0, 1], including constant images.")
        return rep
    out = out.float()

    # the model stays in eval mode and does not update its state ---------------------------
    flipped = _training_modules(defense)
    if flipped:
        rep.add("eval_mode", "error", f"forward switched these modules to training mode: "
                f"{', '.join(flipped[:5])}.", "never call .train() inside forward; the harness "
                "puts the defense in eval mode and it must stay there.")
        defense.eval()
    if _state_fingerprint(defense) != state_before:
        rep.add("eval_mode", "error", "forward changed the defense's parameters or buffers "
                "(e.g. BatchNorm running statistics updated: a BatchNorm left in training "
                "mode).", "keep every module in eval mode at test time (no .train() in "
                "forward, no F.batch_norm(training=True)).")

    # randomness: declared vs observed ------------------------------------------------------
    outs = [out] + [_forward(defense, x, seed + k).float() for k in (1, 2, 3)]
    diff = checks.max_difference(outs)
    scale = float(out.abs().max()) + 1e-8
    observed_random = diff > 1e-5 * max(1.0, scale)
    rep.observed["randomness_max_diff"] = diff
    rep.observed["random_observed"] = observed_random
    if observed_random and not declared["random"]:
        rep.add("randomness", "error", f"forward passes on the same images differ by up to "
                f"{diff:.3g}, but the defense does not declare randomness (a Dropout left "
                "active, or a random transform).", "if the randomness is intended set `random = "
                "True` on the Defense (or on its Preprocessor) so the harness attacks with EOT "
                "and scores the worst of several draws; otherwise make forward deterministic "
                "in eval mode.")
    elif declared["random"] and not observed_random:
        rep.add("randomness", "warning", "the defense declares randomness but four passes under "
                "different seeds gave identical outputs.", "set `random = False` if it is "
                "deterministic (EOT and worst-of-k scoring then cost nothing extra).")

    # batch independence (batch statistics at test time) -----------------------------------
    if not observed_random and len(x) >= 2:
        single = torch.cat([_forward(defense, x[i:i + 1], seed).float()
                            for i in range(min(4, len(x)))])
        bdiff = float((single - out[:len(single)]).abs().max())
        rep.observed["batch_dependence_max_diff"] = bdiff
        if bdiff > 1e-3 * max(1.0, scale):
            rep.add("eval_mode", "error", f"an image's logits change by up to {bdiff:.3g} with the "
                    "other images in its batch: batch statistics are used at test time "
                    "(BatchNorm in training mode, or a per-batch normalisation).", "use running "
                    "statistics in eval mode (leave BatchNorm in eval mode; normalise each image "
                    "on its own).")

    # logits, not probabilities -------------------------------------------------------------
    if checks.looks_like_probabilities(out):
        rep.add("logits", "error", "every output row lies in [0, 1] and sums to 1: the defense "
                "returns probabilities, not logits (gradient attacks on softmax outputs suffer "
                "vanishing gradients, which overstates robustness).", "return the logits: drop the "
                "final softmax (the harness applies its own losses).")
    elif bool((out <= 1e-6).all()) and bool(torch.allclose(out.logsumexp(1), torch.zeros(
            len(out), device=out.device), atol=1e-3)):
        rep.add("logits", "info", "the outputs are log-probabilities (log_softmax); they are "
                "valid logits.")
    if float(out.std(0).max()) < 1e-7 and len(out) > 1:
        rep.add("output", "warning", "the output is the same for every input image.",
                "check that the classifier is trained and actually uses its input.")

    # accuracy on clean data (catches a model expecting [0, 255] or normalised inputs) ------
    acc = float((out.argmax(1) == y).float().mean())
    rep.observed["clean_accuracy_probe"] = acc
    if len(y) >= 20 and acc <= 1.5 / num_classes:
        rep.add("inputs", "warning", f"clean accuracy on {len(y)} images in [0, 1] is "
                f"{100 * acc:.0f}%, about chance ({100 / num_classes:.0f}%).", "if the model "
                "expects pixels in [0, 255] or normalised inputs, move the scaling / "
                "normalisation inside the model; otherwise train it.")

    # gradients -----------------------------------------------------------------------------
    grad, err = _input_gradient(defense, x, y, seed)
    if grad is None:
        seen = f"input gradients are unavailable ({err})"
        bad = len(x)
    else:
        bad = int(checks.bad_gradients(grad).sum())
        seen = f"input gradients are zero or NaN on {bad}/{len(x)} images"
    rep.observed["gradient_bad_samples"] = bad
    if bad:
        if declared["non_differentiable"]:
            rep.add("gradients", "info", f"{seen}, as declared by the non-differentiable "
                    "preprocessor: the harness attacks it with BPDA.")
        else:
            rep.add("gradients", "error", f"{seen}, and no non-differentiable preprocessor is "
                    "declared, so gradient attacks would fail silently (gradient masking).",
                    "put the non-differentiable step in a defenses.base.Preprocessor with "
                    "`differentiable = False` (optionally a surrogate()) so the harness uses "
                    "BPDA; or make forward differentiable (no torch.no_grad, .detach(), numpy or "
                    "rounding in the path).")
    elif declared["non_differentiable"]:
        rep.add("gradients", "info", "gradients flow although the preprocessor is declared "
                "non-differentiable; the harness runs both gradient and BPDA attacks.")
    return rep


def _input_gradient(defense: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int
                    ) -> tuple[torch.Tensor | None, str]:
    """Gradient of the logit margin (true class minus best other class), which, unlike
    cross-entropy, does not underflow to zero on confidently classified images."""
    grad, err = checks.input_gradient(defense, x, y, loss=checks.margin_loss, seed=seed)
    if grad is None:
        return None, (err[:160] if err
                      else "the output does not depend on the input through autograd")
    return grad, ""


def validate_or_raise(defense: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                      num_classes: int, force: bool = False, seed: int = 0,
                      n: int = 32) -> ValidationReport:
    """:func:`validate_defense`, raising :class:`ValidationError` when the submission is
    refused (errors, unless ``force``; fatal problems always)."""
    rep = validate_defense(defense, images, labels, num_classes=num_classes, seed=seed, n=n)
    msg = rep.refusal(forced=force)
    if msg:
        raise ValidationError(msg, rep)
    return rep
