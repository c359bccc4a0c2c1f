"""The decision part of a precision gate: does the low-precision file change what a user decides?

Each side (the FP32 reference and the candidate) gets its own conformal threshold from the same normal images, as
``edge-calibrate`` would give each precision its own; then OK/NG is compared on normal images held back from the
thresholds and on the verify images, at α = 5 % and 10 %. The rank of near-tied image scores (Spearman) is reported
with its confidence interval but does not decide: on seeded weights it failed exports whose decisions never changed.

The decision score is the one the model decides on: the image score, or the map maximum; rules that mix normalised
map and score (Crane's) use min/max constants taken from the reference's normal scores, the same for both sides.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .schema import TRANSIENT

ALPHAS = (0.05, 0.10)
HELD_BACK_EVERY = 4          # every 4th normal image is held back from the thresholds


@dataclass
class DecisionCheck:
    alphas: list[float]
    normal_images: int                     # images the thresholds come from
    held_back_images: int                  # normal images not used for the thresholds
    verify_images: int
    rule: str                              # the decision score compared ("image_score", "map_max", …)
    reference_thresholds: list[list[float | None]]   # [alpha][class]; None: too few normal images for that α
    candidate_thresholds: list[list[float | None]]
    held_back_flips: list[int]             # [alpha] OK/NG disagreements on held-back normal images (all classes)
    verify_flips: list[int]                # [alpha] on the verify images
    verify_agreement: float | None         # lowest share of equal decisions on the verify images over the α's
    score_error_over_margin: float | None  # max |Δ decision score| / (threshold − median normal score), worst class
    spearman_ci95: list[float] | None = None   # of the verify images' score Spearman (Fisher z, Bonett–Wright se)
    notes: list[str] = field(default_factory=list)
    # [alpha] the flipped verify images' indices, one per flipped (image, class); in memory only (the notes name them)
    verify_flipped: list[list[int]] = field(default_factory=list, metadata=TRANSIENT)

    @property
    def evaluated(self) -> bool:
        """At least one α had enough normal images for a threshold."""
        return any(t is not None for row in self.reference_thresholds for t in row)


def conformal_threshold(normal: np.ndarray, alpha: float) -> float | None:
    """The ⌈(n+1)(1−α)⌉-th smallest normal score (split conformal); None when n is too small for α."""
    n = len(normal)
    k = math.ceil((n + 1) * (1 - alpha))
    if n == 0 or k > n:
        return None
    return float(np.sort(normal)[k - 1])


def decision_scores(rule: str, map_max: np.ndarray, scores: np.ndarray, constants: dict | None) -> np.ndarray:
    """[N, K] decision scores from per-image map maxima and image scores (``clipad.runtime.decision``'s rules)."""
    if rule == "image_score":
        return scores
    if rule == "map_max" or constants is None:
        return map_max
    normalized_map = (map_max - constants["p_min"]) / max(constants["p_max"] - constants["p_min"], 1e-12)
    if rule == "aaclip_medical":
        return normalized_map
    return 0.5 * normalized_map + 0.5 * (scores - constants["i_min"]) / max(constants["i_max"] - constants["i_min"],
                                                                         1e-12)


def spearman_ci95(rho: float | None, n: int) -> list[float] | None:
    """95 % interval of a Spearman correlation from n pairs (Fisher z with Bonett & Wright's se √((1+ρ²/2)/(n−3)))."""
    if rho is None or n < 4:
        return None
    r = min(max(rho, -0.999999), 0.999999)
    z, se = math.atanh(r), math.sqrt((1 + r * r / 2) / (n - 3))
    return [round(math.tanh(z - 1.96 * se), 4), round(math.tanh(z + 1.96 * se), 4)]


def check(rule: str, normal_ref: tuple[np.ndarray, np.ndarray], normal_cand: tuple[np.ndarray, np.ndarray],
          verify_ref: tuple[np.ndarray, np.ndarray], verify_cand: tuple[np.ndarray, np.ndarray],
          spearman: float | None = None, alphas: tuple[float, ...] = ALPHAS,
          verify_names: list[str] | None = None) -> DecisionCheck:
    """Compare OK/NG decisions; each argument is (map max [N, K], image scores [N, K]) of one side on one image set.
    Batch padding rows, if any, must already be dropped. Every flip is described in ``notes`` (image, both sides'
    scores and thresholds, and how far the reference's score is from its threshold in units of the largest score
    error on the normal images: a flip within about 2 of them is one the two sides' error alone explains)."""
    notes = []
    constants = None
    if rule not in ("image_score", "map_max"):
        ref_max, ref_scores = normal_ref
        constants = {"p_min": float(ref_max.min()), "p_max": float(ref_max.max()),
                     "i_min": float(ref_scores.min()), "i_max": float(ref_scores.max())}
        notes.append(f"{rule}: normalisation constants from the reference's normal scores, the same for both sides")
    scores = {name: decision_scores(rule, *pair, constants) for name, pair in
              (("normal_ref", normal_ref), ("normal_cand", normal_cand), ("verify_ref", verify_ref),
               ("verify_cand", verify_cand))}
    n = len(scores["normal_ref"])
    held = np.zeros(n, bool)
    held[HELD_BACK_EVERY - 1::HELD_BACK_EVERY] = True
    fit_ref, fit_cand = scores["normal_ref"][~held], scores["normal_cand"][~held]
    classes = fit_ref.shape[1]
    ref_thr = [[conformal_threshold(fit_ref[:, k], a) for k in range(classes)] for a in alphas]
    cand_thr = [[conformal_threshold(fit_cand[:, k], a) for k in range(classes)] for a in alphas]
    held_flips, verify_flips, verify_flipped, agreement = [], [], [], []
    n_verify = len(scores["verify_ref"])
    error = np.abs(scores["normal_ref"] - scores["normal_cand"]).max(axis=0)
    held_index = np.flatnonzero(held)
    names = {"held-back normal": [f"normal image {i + 1} of {n}" for i in held_index],
             "verify": list(verify_names) if verify_names is not None else [f"image {i + 1}" for i in range(n_verify)]}
    for i, alpha in enumerate(alphas):
        if any(t is None for t in ref_thr[i] + cand_thr[i]):
            notes.append(f"α = {alpha:g}: {len(fit_ref)} normal images are too few for a threshold (need "
                         f"{math.ceil(1 / alpha) - 1})")
            held_flips.append(0)
            verify_flips.append(0)
            verify_flipped.append([])
            continue
        r_thr, c_thr = np.array(ref_thr[i]), np.array(cand_thr[i])
        for kind, ref, cand in (("held-back normal", scores["normal_ref"][held], scores["normal_cand"][held]),
                                ("verify", scores["verify_ref"], scores["verify_cand"])):
            flipped = (ref >= r_thr) != (cand >= c_thr)
            (held_flips if kind != "verify" else verify_flips).append(int(flipped.sum()))
            if kind == "verify":
                verify_flipped.append([int(j) for j in np.nonzero(flipped)[0]])   # one entry per (image, class)
            notes += [flip_note(kind, names[kind][j], alpha, k, classes, ref[j, k], r_thr[k], cand[j, k], c_thr[k],
                                error[k]) for j, k in zip(*np.nonzero(flipped))]
        flips = verify_flips[-1]
        if n_verify:
            agreement.append(1.0 - flips / (n_verify * classes))
            notes += flip_rate_note(alpha, flips, n_verify * classes)
    margin_error = None
    evaluated = [i for i in range(len(alphas)) if None not in ref_thr[i]]
    if evaluated:
        i = min(evaluated, key=lambda j: alphas[j])
        margin = np.array(ref_thr[i]) - np.median(fit_ref, axis=0)
        margin_error = float(np.max(error / np.maximum(margin, 1e-12)))
    return DecisionCheck(
        alphas=list(alphas), normal_images=int(len(fit_ref)), held_back_images=int(held.sum()),
        verify_images=n_verify, rule=rule, reference_thresholds=ref_thr, candidate_thresholds=cand_thr,
        held_back_flips=held_flips, verify_flips=verify_flips, verify_flipped=verify_flipped,
        verify_agreement=min(agreement) if agreement else None, score_error_over_margin=margin_error,
        spearman_ci95=spearman_ci95(spearman, n_verify), notes=notes)


def flip_note(kind: str, name: str, alpha: float, k: int, classes: int, ref: float, ref_thr: float, cand: float,
              cand_thr: float, error: float) -> str:
    """One OK/NG flip in words (a note, so that schema-7 readers load the report)."""
    def side(value: float, threshold: float) -> str:
        return "NG" if value >= threshold else "OK"

    distance = abs(ref - ref_thr) / error if error > 0 else math.inf
    return (f"flip: {kind} {name}{f' (class {k})' if classes > 1 else ''} at α = {alpha:g}: reference "
            f"{ref:.6g} {side(ref, ref_thr)} (threshold {ref_thr:.6g}), candidate {cand:.6g} {side(cand, cand_thr)} "
            f"(threshold {cand_thr:.6g}); the reference is {distance:.2f}× the largest normal-image score error "
            f"({error:.3g}) from its threshold")


def flip_rate_note(alpha: float, flips: int, decisions: int) -> list[str]:
    """The verify images' flip rate with its exact 95 % interval: 0 flips in 20 decisions still allows a rate up to
    17 %, so the note says how much the count shows (none without scipy, which the export extra has)."""
    try:
        from scipy.stats import binomtest
    except ImportError:
        return []
    interval = binomtest(flips, decisions).proportion_ci(0.95, method="exact")
    return [f"verify flip rate at α = {alpha:g}: {flips}/{decisions}, 95 % interval {interval.low:.1%} … "
            f"{interval.high:.1%} (Clopper–Pearson)"]
