"""One comparator for every "does this backend/precision still give the reference's outputs" question: the export
parity gate (torch vs ONNX Runtime), the precision gates (FP32 ONNX vs the converted ONNX), ``edge-bench``'s accuracy
columns, ``edge-eval --compare`` and the real TensorRT engine test (FP32 ONNX vs engine).

``compare_runners(reference, candidate, images)`` runs two backends on the same images and measures (``Comparator``
when the outputs come in batches); ``gate(comparison, limits)`` decides. A non-finite value in either side,
or a map that is constant on one side only, fails every gate and names the images: reductions never skip them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .decision_check import DecisionCheck

CONSTANT_RTOL = 1e-6   # a map whose max − min is below this share of its magnitude counts as constant


@dataclass
class OutputError:
    max_abs: float | None = 0.0     # None (stored NaN): no image had finite outputs on both sides
    max_rel: float | None = 0.0


@dataclass
class FeatureError:
    """patch_features [B, T, P, C] (unit patch tokens a few-shot memory compares, ``--memory-features``): the cosine
    of each reference token with the candidate's, which is what moves a nearest-neighbour similarity."""
    cosine: list[float]             # per image, the smallest over its T × P tokens
    cosine_min: float | None
    cosine_mean: float | None       # over every token of every image
    max_abs: float | None


@dataclass
class Comparison:
    images: int
    names: list[str]
    anomaly_map: OutputError
    image_score: OutputError
    map_range: float                          # largest reference max − min of one map: the scale of map errors
    map_pearson: list[float]                  # per image, the minimum over classes
    map_pearson_min: float | None
    map_pearson_mean: float | None
    score_spearman: float | None              # image-score rank correlation, minimum over classes (≥ 3 images)
    score_reference_std: float                # spread of the reference scores: near-ties make Spearman noisy
    nonfinite_images: dict[str, list[str]]    # {"reference": [...], "candidate": [...]}
    constant_map_images: list[str]            # constant on one side only
    patch_features: FeatureError | None = None   # when both sides give them

    @property
    def map_error_over_range(self) -> float:
        if self.anomaly_map.max_abs is None:
            return float("nan")
        return self.anomaly_map.max_abs / max(self.map_range, 1e-12)


@dataclass
class GateLimits:
    map_error_over_range: float | None = None   # max |Δmap| / reference map range
    score_max_abs: float | None = None          # max |Δscore|
    map_pearson_min: float | None = None
    score_spearman_min: float | None = None
    decision_flips_max: int | None = None       # OK/NG flips allowed on held-back normal images, at every α
    decision_agreement_min: float | None = None  # share of equal OK/NG decisions on the verify images, at every α
    features_cosine_min: float | None = None    # smallest patch_features token cosine (models that output them)


@dataclass
class RoundingPins:
    """Crane+'s D-Attn mask entries within float32 rounding of its hard threshold, pinned to the torch reference's
    mask for the parity comparison (``clipad.export.dattn_band``); per verify image."""
    images: list[str]
    band: list[float]                 # ε on S' = γ(S − β·mean S), from the float32 error of the similarity
    within_band: list[int]            # off-diagonal entries with |S'| ≤ ε (torch's S')
    pinned_flips: list[int]           # of those, where ONNX Runtime's mask differed: pinned to torch's
    flips_outside_band: list[int]     # differences farther than ε from the threshold: real, never pinned
    cap: int                          # most pinned flips allowed per image (PIN_SHARE_MAX of the P² entries)
    unpinned_map_error_over_range: float   # the plain comparison's error, before pinning


@dataclass
class GateReport:
    """A comparison, the limits it was held to, and the verdict; stored in the manifest."""
    name: str                       # "parity", "fp16", "int8", "engine"
    reference: str                  # what produced the reference outputs, e.g. "torch", "onnxruntime fp32"
    candidate: str
    comparison: Comparison
    limits: GateLimits
    passed: bool
    failures: list[str] = field(default_factory=list)
    accepted_despite_failure: bool = False
    decision: DecisionCheck | None = None   # OK/NG at each side's own threshold (precision gates with normal images)
    rounding_pins: RoundingPins | None = None   # parity of Crane+ after pinning D-Attn entries within rounding


# Parity's features limit: FP32 torch vs ONNX Runtime differ by float rounding (1 − cos ~1e-7 for a unit token);
# a wrong token order, tap or normalisation gives cosines far below 1 − 1e-4. Precisions' limits: runtime.precisions.
PARITY_LIMITS = GateLimits(map_error_over_range=1e-4, score_max_abs=1e-5, features_cosine_min=1 - 1e-4)


def is_flat(x: np.ndarray) -> bool:
    x = np.asarray(x, np.float64)
    return bool(np.ptp(x) <= CONSTANT_RTOL * max(float(np.abs(x).max()), 1e-30))


def map_pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson of two maps; a map constant on one side only scores 0, two equal constant maps 1."""
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    da, db = a - a.mean(), b - b.mean()
    flat_a, flat_b = is_flat(a), is_flat(b)
    if flat_a or flat_b:
        same = flat_a and flat_b and np.allclose(a, b, rtol=1e-5, atol=1e-7)
        return 1.0 if same else 0.0
    return float(np.clip((da @ db) / np.sqrt((da @ da) * (db @ db)), -1.0, 1.0))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get their average rank (scipy.stats.rankdata's default)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Rank correlation; None when either side has fewer than 3 values or no spread."""
    if len(a) < 3:
        return None
    ra, rb = average_ranks(np.asarray(a, np.float64)), average_ranks(np.asarray(b, np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra @ ra) * (rb @ rb))
    return None if denom == 0 else float(np.clip((ra @ rb) / denom, -1.0, 1.0))


class Comparator:
    """``compare`` fed in batches, so memory holds one batch of maps whatever the number of images (the gates,
    ``edge-eval --compare``, ``edge-bench``)."""

    def __init__(self):
        self.names: list[str] = []
        self.pearson: list[float] = []
        self.constant: list[str] = []
        self.bad = {"reference": [], "candidate": []}
        self.map_abs = self.map_rel = self.score_abs = self.score_rel = 0.0
        self.map_range = 0.0
        self.finite_rows = 0
        self.ref_scores: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []
        self.cosine: list[float] = []
        self.cosine_sum, self.tokens, self.features_abs = 0.0, 0, 0.0

    def add(self, reference: tuple[np.ndarray, np.ndarray], candidate: tuple[np.ndarray, np.ndarray],
            names: list[str] | None = None) -> None:
        ref_maps, ref_scores = (np.asarray(a) for a in reference[:2])
        maps, scores = (np.asarray(a) for a in candidate[:2])
        ref_feats, feats = (np.asarray(side[2]) if len(side) > 2 else None for side in (reference, candidate))
        if ref_feats is None or feats is None:
            ref_feats = feats = None          # one side without them (a backend that drops them): not compared
        elif ref_feats.shape != feats.shape:
            raise ValueError(f"patch_features shapes differ: reference {ref_feats.shape}, candidate {feats.shape}")
        if ref_maps.shape != maps.shape or ref_scores.shape != scores.shape:
            raise ValueError(f"shapes differ: reference {ref_maps.shape}/{ref_scores.shape}, candidate "
                             f"{maps.shape}/{scores.shape}")
        n = len(ref_maps)
        start = len(self.names)
        names = list(names) if names is not None else [f"#{start + i}" for i in range(n)]
        if len(names) != n:
            raise ValueError(f"{len(names)} names for {n} images")
        self.names += names
        for i in range(n):
            ref_ok = bool(np.isfinite(ref_maps[i]).all() and np.isfinite(ref_scores[i]).all()
                          and (ref_feats is None or np.isfinite(ref_feats[i]).all()))
            cand_ok = bool(np.isfinite(maps[i]).all() and np.isfinite(scores[i]).all()
                           and (feats is None or np.isfinite(feats[i]).all()))
            if not ref_ok:
                self.bad["reference"].append(names[i])
            if not cand_ok:
                self.bad["candidate"].append(names[i])
            if not (ref_ok and cand_ok):
                self.pearson.append(0.0)
                if ref_feats is not None:
                    self.cosine.append(0.0)
                continue
            if ref_feats is not None:
                self._add_features(ref_feats[i], feats[i])
            classes = range(ref_maps.shape[1])
            self.pearson.append(min(map_pearson(ref_maps[i, k], maps[i, k]) for k in classes))
            if any(is_flat(ref_maps[i, k]) != is_flat(maps[i, k]) for k in classes):
                self.constant.append(names[i])
            self.map_range = max([self.map_range] + [float(np.ptp(ref_maps[i, k])) for k in classes])
            self.map_abs, self.map_rel = _worse((self.map_abs, self.map_rel), ref_maps[i], maps[i])
            self.score_abs, self.score_rel = _worse((self.score_abs, self.score_rel), ref_scores[i], scores[i])
            self.ref_scores.append(np.asarray(ref_scores[i], np.float64).reshape(-1))
            self.scores.append(np.asarray(scores[i], np.float64).reshape(-1))
            self.finite_rows += 1

    def _add_features(self, ref: np.ndarray, cand: np.ndarray) -> None:
        r, c = ref.astype(np.float64), cand.astype(np.float64)
        norms = np.linalg.norm(r, axis=-1) * np.linalg.norm(c, axis=-1)
        cos = np.where(norms > 0, (r * c).sum(axis=-1) / np.maximum(norms, 1e-300), 0.0)
        self.cosine.append(float(cos.min()))
        self.cosine_sum += float(cos.sum())
        self.tokens += cos.size
        self.features_abs = max(self.features_abs, float(np.abs(r - c).max(initial=0.0)))

    def result(self) -> Comparison:
        nan = float("nan")
        rho, std = None, 0.0
        if self.finite_rows:
            ref, cand = np.stack(self.ref_scores), np.stack(self.scores)
            std = float(ref.std(axis=0).min())
            if self.finite_rows >= 3:
                per_class = [spearman(ref[:, k], cand[:, k]) for k in range(ref.shape[1])]
                rho = None if any(r is None for r in per_class) else min(per_class)
        any_finite = self.finite_rows > 0
        return Comparison(
            images=len(self.names), names=list(self.names),
            anomaly_map=OutputError(self.map_abs, self.map_rel) if any_finite else OutputError(nan, nan),
            image_score=OutputError(self.score_abs, self.score_rel) if any_finite else OutputError(nan, nan),
            map_range=self.map_range, map_pearson=[round(p, 7) for p in self.pearson],
            map_pearson_min=min(self.pearson) if self.pearson else None,
            map_pearson_mean=float(np.mean(self.pearson)) if self.pearson else None,
            score_spearman=rho, score_reference_std=std,
            nonfinite_images={k: list(v) for k, v in self.bad.items()}, constant_map_images=list(self.constant),
            patch_features=None if not self.cosine else FeatureError(
                cosine=[round(c, 7) for c in self.cosine], cosine_min=min(self.cosine),
                cosine_mean=self.cosine_sum / self.tokens if self.tokens else None,
                max_abs=self.features_abs if self.tokens else None))


def _worse(current: tuple[float, float], ref: np.ndarray, cand: np.ndarray) -> tuple[float, float]:
    r, c = np.asarray(ref, np.float64), np.asarray(cand, np.float64)
    diff = np.abs(r - c)
    return (max(current[0], float(diff.max(initial=0.0))),
            max(current[1], float((diff / np.maximum(np.abs(r), 1e-12)).max(initial=0.0))))


def compare(reference: tuple[np.ndarray, np.ndarray], candidate: tuple[np.ndarray, np.ndarray],
            names: list[str] | None = None) -> Comparison:
    """Compare (anomaly_map [N, K, S, S], image_score [N, K]) of a reference and a candidate on the same N images."""
    comparator = Comparator()
    comparator.add(reference, candidate, names)
    return comparator.result()


def compare_runners(reference, candidate, images: np.ndarray, names: list[str] | None = None,
                    chunk: int = 8, progress=None, on_outputs=None) -> Comparison:
    """Run the same uint8 images [N, S, S, 3] through two ``Backend``s (each split and padded to its own batch
    range) and compare their outputs, ``chunk`` images at a time. ``on_outputs(reference_outputs,
    candidate_outputs)`` sees each chunk's outputs, for a caller that needs more than the comparison."""
    from .batching import run_batched

    names = list(names) if names is not None else [f"#{i}" for i in range(len(images))]
    comparator = Comparator()
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk]
        outputs = (run_batched(reference.run, part, *reference.batch_range),
                   run_batched(candidate.run, part, *candidate.batch_range))
        comparator.add(*outputs, names[start:start + chunk])
        if on_outputs is not None:
            on_outputs(*outputs)
        if progress is not None:
            progress(len(part))
    return comparator.result()


def _listed(images: list[str], limit: int = 8) -> str:
    more = f" and {len(images) - limit} more" if len(images) > limit else ""
    return ", ".join(images[:limit]) + more


def gate(comparison: Comparison, limits: GateLimits, name: str, reference: str, candidate: str,
         decision: DecisionCheck | None = None) -> GateReport:
    """Hold a comparison (and a decision check, when the limits ask for one) to limits; every failure is a phrase
    that names the numbers (and the images)."""
    c, failures = comparison, []
    for side in ("reference", "candidate"):
        if c.nonfinite_images[side]:
            failures.append(f"non-finite {side} outputs (NaN/inf) on {_listed(c.nonfinite_images[side])}")
    if c.constant_map_images:
        failures.append(f"map constant on one side only on {_listed(c.constant_map_images)}")
    if limits.map_error_over_range is not None and not c.map_error_over_range <= limits.map_error_over_range:
        failures.append(f"anomaly_map error {c.map_error_over_range:.2e} of range "
                        f"(limit {limits.map_error_over_range:g})")
    if limits.score_max_abs is not None and not c.image_score.max_abs <= limits.score_max_abs:
        failures.append(f"image_score error {c.image_score.max_abs:.2e} (limit {limits.score_max_abs:g})")
    if limits.map_pearson_min is not None:
        if c.map_pearson_min is None or not c.map_pearson_min >= limits.map_pearson_min:
            low = [nm for nm, p in zip(c.names, c.map_pearson) if not p >= limits.map_pearson_min]
            failures.append(f"map Pearson min {c.map_pearson_min if c.map_pearson_min is not None else float('nan'):.5f}"
                            f" (need ≥ {limits.map_pearson_min}) on {_listed(low)}")
    f = c.patch_features
    if limits.features_cosine_min is not None and f is not None and not f.cosine_min >= limits.features_cosine_min:
        low = [nm for nm, x in zip(c.names, f.cosine) if not x >= limits.features_cosine_min]
        failures.append(f"patch_features cosine min {f.cosine_min:.6f} (need ≥ {limits.features_cosine_min:g}) on "
                        f"{_listed(low)}")
    failures += decision_failures(decision, limits)
    if limits.score_spearman_min is not None:
        if c.score_spearman is None:
            failures.append("score Spearman not computable (fewer than 3 finite verify images, or tied scores)")
        elif not c.score_spearman >= limits.score_spearman_min:
            failures.append(f"score Spearman {c.score_spearman:.4f} (need ≥ {limits.score_spearman_min}; reference "
                            f"score std {c.score_reference_std:.2e}, max|Δscore| {c.image_score.max_abs:.2e})")
    return GateReport(name=name, reference=reference, candidate=candidate, comparison=c, limits=limits,
                      passed=not failures, failures=failures, decision=decision)


def decision_failures(decision: DecisionCheck | None, limits: GateLimits) -> list[str]:
    if limits.decision_flips_max is None and limits.decision_agreement_min is None:
        return []
    if decision is None or not decision.evaluated:
        return ["no OK/NG decision check (too few normal images for a threshold)"]
    failures = []
    alphas = ", ".join(f"{a:g}" for a in decision.alphas)
    if limits.decision_flips_max is not None and max(decision.held_back_flips) > limits.decision_flips_max:
        failures.append(f"OK/NG flips on {decision.held_back_images} held-back normal images at α = {alphas}: "
                        f"{decision.held_back_flips} (allowed {limits.decision_flips_max})")
    if limits.decision_agreement_min is not None and decision.verify_agreement is not None \
            and not decision.verify_agreement >= limits.decision_agreement_min:
        failures.append(f"OK/NG agreement on {decision.verify_images} verify images {decision.verify_agreement:.1%} "
                        f"(flips {decision.verify_flips} at α = {alphas}; need ≥ {limits.decision_agreement_min:.0%})")
    return failures
