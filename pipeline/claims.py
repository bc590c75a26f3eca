"""The article's claims that the comparison report checks: thresholds and comparisons as data, one place.

Each :class:`Claim` names a measured quantity by its path into the stages' metrics files and says how
it must compare, either with a constant ``threshold`` or with the best (lowest) of other measured
quantities (``against``). :func:`evaluate` reads the quantities out of the structured metrics and
returns one :class:`ClaimRow` per claim with the verdict ``holds``, ``FAILS`` or ``not run``.

The metrics are the parsed JSON files the stages write (and log as MLflow artifacts under ``metrics/``)::

    {"toy": <toy.json>, "annealing": <annealing.json>,
     "ablation": {<sigma_end as float>: <ablation_<sigma_end>.json>}, "fid_ref": <fid_ref.json>}

A path element :data:`HEADLINE` stands for the headline score of the dict reached so far (FID of the
first extractor at its sample size, :func:`pipeline.quality.headline`); the metric name is composed
from the dict's ``extractors`` and ``n`` fields, never parsed. A dict without ``extractors`` falls
back to ``fid_ref``'s ``extractors`` (the reference every quality score is computed against).

Tests import the thresholds from here instead of repeating the numbers.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from pipeline.quality import headline

NOT_RUN = "not run"
HOLDS = "holds"
FAILS = "FAILS"

# ---- Figure 1: the 2-D mixture 0.8 N((5,5), I) + 0.2 N((-5,-5), I); error = |weight of mode 1 - 0.8|
ANNEALED_EXACT_MAX = 0.02     # annealed Langevin with the exact scores recovers the weights to within this
ANNEALED_LEARNED_MAX = 0.05   # ... and with the learned (ScoreMLP) scores
PLAIN_LANGEVIN_MIN = 0.15     # plain Langevin (no annealing) gets them wrong by more than this, both scores
# ---- Figure 4: the smallest noise level sigma_end
ABLATION_LARGE_SIGMA = 0.1            # this sigma_end gives worse samples (higher FID) ...
ABLATION_SMALL_SIGMAS = (0.01, 0.001)  # ... than the best of these

HEADLINE = "<headline>"
COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, "<": operator.lt, ">": operator.gt, ">=": operator.ge}

Path = tuple[Any, ...]


@dataclass(frozen=True)
class Claim:
    """``measure(quantity) <comparison> threshold`` or ``... <comparison> min(measure(q) for q in against)``."""

    name: str                      # stable id
    figure: str                    # the article's figure
    text: str                      # the sentence the report shows
    quantity: Path                 # where the measured value is (see the module doc)
    comparison: str                # a key of COMPARISONS
    threshold: float | None = None
    against: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if self.comparison not in COMPARISONS:
            raise ValueError(f"claim {self.name}: comparison {self.comparison!r} not in {sorted(COMPARISONS)}")
        if (self.threshold is None) == (not self.against):
            raise ValueError(f"claim {self.name}: give exactly one of threshold and against")


def _toy(scores: str, sampler: str) -> Path:
    return ("toy", scores, "mode_weight_error", sampler)


# Figure 1: (id, scores, sampler, comparison, threshold) — annealing recovers the weights, plain Langevin does not
_FIG1 = (("fig1_annealed_exact", "exact", "annealed_langevin", "<=", ANNEALED_EXACT_MAX),
         ("fig1_annealed_learned", "learned", "annealed_langevin", "<=", ANNEALED_LEARNED_MAX),
         ("fig1_plain_exact", "exact", "langevin", ">", PLAIN_LANGEVIN_MIN),
         ("fig1_plain_learned", "learned", "langevin", ">", PLAIN_LANGEVIN_MIN))
_SAMPLER_TEXT = {"annealed_langevin": "annealed Langevin", "langevin": "plain Langevin"}

CLAIMS: tuple[Claim, ...] = (
    *(Claim(name, "Figure 1", f"{_SAMPLER_TEXT[sampler]}, {scores} scores: mode weight error {op} {threshold:g}",
            _toy(scores, sampler), op, threshold) for name, scores, sampler, op, threshold in _FIG1),
    Claim("fig23_annealed_beats_fixed_sigma", "Figures 2/3",
          "annealed Langevin gives better samples (lower FID) than Langevin at one fixed sigma",
          ("annealing", "annealed_langevin", HEADLINE), "<",
          against=(("annealing", "langevin_fixed_sigma", HEADLINE),)),
    Claim("fig4_large_sigma_end_worse", "Figure 4",
          f"sigma_end {ABLATION_LARGE_SIGMA:g} gives worse samples (higher FID) than the best of "
          + " / ".join(f"{s:g}" for s in ABLATION_SMALL_SIGMAS),
          ("ablation", ABLATION_LARGE_SIGMA, HEADLINE), ">",
          against=tuple(("ablation", s, HEADLINE) for s in ABLATION_SMALL_SIGMAS)),
)


@dataclass(frozen=True)
class ClaimRow:
    claim: Claim
    value: float | None            # the measured quantity (None: not measured)
    reference: float | None        # the threshold, or the best measured `against` value
    verdict: str                   # HOLDS | FAILS | NOT_RUN


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _child(node: Any, key: Any) -> Any:
    if not isinstance(node, Mapping):
        return None
    if key in node:
        return node[key]
    if isinstance(key, float):  # sigma_end keys: 0.1 == "0.1" == 1e-1
        for k, v in node.items():
            try:
                if math.isclose(float(k), key, rel_tol=1e-9):
                    return v
            except (TypeError, ValueError):
                continue
    return None


def headline_score(entry: Any, default_extractors: list[str] | None = None) -> tuple[str, float] | None:
    """(metric name, value) of the headline score of one quality dict; see the module doc for the fallback."""
    if not isinstance(entry, Mapping):
        return None
    if not entry.get("extractors") and default_extractors:
        entry = {**entry, "extractors": list(default_extractors)}
    found = headline(dict(entry))
    if found is None or _number(found[1]) is None:
        return None
    return found[0], float(found[1])


def measure(metrics: Mapping[str, Any], path: Path) -> float | None:
    """The number at ``path`` in ``metrics`` (None when any part of it is missing)."""
    node: Any = metrics
    for key in path:
        if key == HEADLINE:
            ref = metrics.get("fid_ref") if isinstance(metrics, Mapping) else None
            found = headline_score(node, (ref or {}).get("extractors") if isinstance(ref, Mapping) else None)
            return found[1] if found else None
        node = _child(node, key)
        if node is None:
            return None
    return _number(node)


def evaluate(metrics: Mapping[str, Any], claims: tuple[Claim, ...] = CLAIMS) -> list[ClaimRow]:
    """One row per claim: the measured value, what it was compared with, and the verdict."""
    rows = []
    for claim in claims:
        value = measure(metrics, claim.quantity)
        if claim.against:
            measured = [v for v in (measure(metrics, q) for q in claim.against) if v is not None]
            reference = min(measured) if measured else None
        else:
            reference = claim.threshold
        if value is None or reference is None:
            verdict = NOT_RUN
        else:
            verdict = HOLDS if COMPARISONS[claim.comparison](value, reference) else FAILS
        rows.append(ClaimRow(claim, value, reference, verdict))
    return rows
