"""The stored schema as types: the closed vocabularies, the per-sample row, the flag records.

What the result store (:mod:`bench.core.store`) holds and the leaderboard reads, declared once:

* closed vocabularies as ``str`` enums (after RobustBench's ``enums.py``): :class:`Threat`,
  :class:`Schedule`, :class:`AttackKind`, :class:`CellStatus`. Functions accept ``str | Enum``
  (:meth:`_Vocabulary.parse`) and store the plain string value, so keys and stored JSON are the
  same as with strings;
* :class:`SampleRow`: one sample of one cell (the stored unit of the benchmark, EVALUATION.md
  "Scoring"); the store's ``samples`` table has exactly these columns (:data:`SAMPLE_FIELDS`);
* flags: ``{code, title, seen, try, ...}`` dicts built by :func:`flag` from :data:`FLAG_DOCS`
  and rendered by :func:`format_flags` (the leaderboard's Flags column).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterable, Mapping


class _Vocabulary(str, Enum):
    """A closed vocabulary whose members ARE their string values (``str()``, ``format()``)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(str(m.value) for m in cls)

    @classmethod
    def parse(cls, value: str | Enum) -> str:
        """The plain string value of ``value`` (a member or its string); ValueError otherwise."""
        raw = value.value if isinstance(value, Enum) else value
        return str(cls(raw).value)


class Threat(_Vocabulary):
    """Threat models: an Linf or L2 ball, or none (unbounded / semantic attacks)."""

    LINF = "linf"
    L2 = "l2"
    NONE = "none"


class Schedule(_Vocabulary):
    """``full``: every attack on every sample; ``worst-case``: each attack only on the samples
    every earlier attack of the same (threat, eps) left robust."""

    FULL = "full"
    WORST_CASE = "worst-case"


class AttackKind(_Vocabulary):
    """What an attack knows about the defense (the matrix checks compare kinds)."""

    CLEAN = "clean"
    WHITE_BOX = "white-box"
    BLACK_BOX = "black-box"
    TRANSFER = "transfer"
    SEMANTIC = "semantic"


class CellStatus(_Vocabulary):
    RUNNING = "running"
    DONE = "done"


#: the attack label of a defense's clean cell
CLEAN = AttackKind.CLEAN.value


@dataclass
class SampleRow:
    """One sample of one cell, as stored. ``idx`` and ``sample_id`` (the position in the
    evaluation set and its stable id) are filled in by the runner when the batch is stored.

    Rows also read and write like the dicts the store returns (``row["robust"]``)."""

    label: int
    attacked: int
    clean_correct: int
    clean_flagged: int
    adv_correct: int
    adv_flagged: int
    robust: int
    norm: float
    iterations: int | None
    forward_passes: int
    backward_passes: int
    any_iterate_adversarial: int | None = None
    adv_pred: int | None = None
    idx: int | None = None
    sample_id: str | None = None

    def __getitem__(self, name: str) -> Any:
        if name not in _ROW_FIELDS:
            raise KeyError(name)
        return getattr(self, name)

    def __setitem__(self, name: str, value: Any) -> None:
        if name not in _ROW_FIELDS:
            raise KeyError(name)
        setattr(self, name, value)

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name) if name in _ROW_FIELDS else default

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_ROW_FIELDS = frozenset(f.name for f in dataclasses.fields(SampleRow))

#: the store's ``samples`` columns (after ``cell_key``), in table order
SAMPLE_FIELDS = (
    "idx", "sample_id", "label", "attacked", "clean_correct", "clean_flagged", "adv_correct",
    "adv_flagged", "robust", "norm", "iterations", "forward_passes", "backward_passes",
    "any_iterate_adversarial", "adv_pred",
)
assert set(SAMPLE_FIELDS) == _ROW_FIELDS, "SampleRow and SAMPLE_FIELDS disagree"


# flags ----------------------------------------------------------------------------------------
FLAG_DOCS: dict[str, tuple[str, str]] = {
    "randomness": ("Randomised defense",
                   "attack with EOT (eot+pgd; autoattack version=rand) and score the worst of "
                   "several draws (random_draws)"),
    "probability_outputs": ("Outputs look like probabilities",
                            "return logits; cross-entropy on softmax outputs has vanishing "
                            "gradients (attack the logits or use a margin loss)"),
    "zero_gradients": ("Zero, NaN or missing input gradients",
                       "gradient masking: use BPDA (identity or surrogate backward) or a "
                       "black-box attack (square)"),
    "binarization": ("Binarization test failed (attacks too weak for this defense)",
                     "on a binary task where an adversarial example inside the ball is known to "
                     "exist, the attack did not find it: add BPDA/EOT or a stronger attack "
                     "(Zimmermann et al. 2022)"),
    "unstable_predictions": ("Unstable predictions under small noise",
                             "the loss varies under tiny random perturbations: use EOT or a "
                             "smoothed loss (Pintor et al. 2022)"),
    "iterative_beats_single_step": ("A single-step attack beat the iterative one",
                                    "the iterative attack is misconfigured or its gradients are "
                                    "masked: check step size, use BPDA/EOT"),
    "gradient_free": ("A gradient-free attack beat the gradient attack",
                      "gradient masking: use BPDA/EOT or report the gradient-free number"),
    "silent_success": ("Attack did not return its best iterate",
                       "return the best iterate (an adversarial iterate was seen but the "
                       "returned point is not adversarial)"),
    "non_convergence": ("Attack has not converged",
                        "more steps or restarts; check the step size"),
    "blackbox_beats_whitebox": ("Black-box or transfer attack beats the white-box attacks",
                                "gradient masking: use BPDA/EOT, more steps or restarts, another "
                                "loss; the worst case already counts the black-box points"),
    "non_monotone_eps": ("Robust accuracy rises with epsilon",
                         "the attack fails at larger budgets: check step sizes, add steps or "
                         "restarts"),
    "above_chance_large_eps": ("Accuracy above chance at Linf eps >= 0.5",
                               "at eps 0.5 every image can be turned grey: the attack is failing "
                               "(gradient masking or a bug)"),
    "unbounded_attack_fails": ("Effectively unbounded attack below ~100% success",
                               "an unbounded attack must always succeed: gradient masking or a "
                               "bug; try BPDA, EOT, a black-box attack"),
    "implausible_detector": ("Detector robustness implausibly high (Tramer 2021)",
                             "a detector robust at eps gives a classifier robust at eps/2: its "
                             "number beats the best known classifier at eps/2; run "
                             "detector-aware attacks with more steps, check for masking"),
    "surrogate_transfer_failure": ("BPDA surrogate does not transfer",
                                   "points adversarial on the surrogate are not adversarial on "
                                   "the real defense: improve the surrogate, try identity BPDA, "
                                   "EOT or more steps"),
    "dynamic_defense": ("AutoAttack: dynamic defense suspected",
                        "the model computes gradients in its forward; AutoAttack may be "
                        "insufficient, use adaptive attacks"),
}


def flag(code: str, seen: str, **extra: Any) -> dict[str, Any]:
    """A flag record: ``code``, its ``title`` and ``try`` (what to do) from :data:`FLAG_DOCS`,
    and what was ``seen``."""
    title, suggestion = FLAG_DOCS.get(code, (code, ""))
    return {"code": code, "title": title, "seen": seen, "try": suggestion, **extra}


def format_flags(flags: Iterable[Mapping[str, Any]], *, detail: bool = True) -> str:
    """The leaderboard's Flags cell: ``code: what was seen (try: what to do)`` per flag."""
    flags = list(flags)
    if not flags:
        return "-"
    if not detail:
        return ", ".join(f["code"] for f in flags)
    parts = []
    for f in flags:
        where = f.get("attacks")
        where = f" [{', '.join(dict.fromkeys(where))}]" if where else ""
        tip = f" (try: {f['try']})" if f.get("try") else ""
        parts.append(f"{f['code']}{where}: {f.get('seen', '')}{tip}")
    return "; ".join(parts)
