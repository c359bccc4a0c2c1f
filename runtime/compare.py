"""One comparator for every "does this backend/precision still give the reference's outputs" question: the export
parity gate (torch vs ONNX Runtime), the FP16/INT8 accuracy gates (FP32 ONNX vs the converted ONNX) and the real
TensorRT engine test (FP32 ONNX vs engine).

``compare(reference, candidate, names)`` measures; ``gate(report, limits)`` decides. A non-finite value in either side,
or a map that is constant on one side only, fails every gate and names the images: reductions never skip them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CONSTANT_RTOL = 1e-6   # a map whose max − min is below this share of its magnitude counts as constant


@dataclass
class OutputError:
    max_abs: float = 0.0
    max_rel: float = 0.0


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

    @property
    def map_error_over_range(self) -> float:
        return self.anomaly_map.max_abs / max(self.map_range, 1e-12)


@dataclass
class GateLimits:
    map_error_over_range: float | None = None   # max |Δmap| / reference map range
    score_max_abs: float | None = None          # max |Δscore|
    map_pearson_min: float | None = None
    score_spearman_min: float | None = None


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


PARITY_LIMITS = GateLimits(map_error_over_range=1e-4, score_max_abs=1e-5)
PRECISION_LIMITS = {"fp16": GateLimits(map_pearson_min=0.999),
                    "int8": GateLimits(map_pearson_min=0.99, score_spearman_min=0.98),
                    "int8-cpu": GateLimits(map_pearson_min=0.99, score_spearman_min=0.98)}


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


def _error(ref: np.ndarray, cand: np.ndarray, finite: np.ndarray) -> OutputError:
    if not finite.any():
        return OutputError(float("nan"), float("nan"))
    r, c = ref[finite].astype(np.float64), cand[finite].astype(np.float64)
    diff = np.abs(r - c)
    return OutputError(float(diff.max()), float((diff / np.maximum(np.abs(r), 1e-12)).max()))


def compare(reference: tuple[np.ndarray, np.ndarray], candidate: tuple[np.ndarray, np.ndarray],
            names: list[str] | None = None) -> Comparison:
    """Compare (anomaly_map [N, K, S, S], image_score [N, K]) of a reference and a candidate on the same N images."""
    ref_maps, ref_scores = (np.asarray(a) for a in reference)
    maps, scores = (np.asarray(a) for a in candidate)
    if ref_maps.shape != maps.shape or ref_scores.shape != scores.shape:
        raise ValueError(f"shapes differ: reference {ref_maps.shape}/{ref_scores.shape}, candidate "
                         f"{maps.shape}/{scores.shape}")
    n = len(ref_maps)
    names = list(names) if names is not None else [f"#{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} names for {n} images")

    def bad(m, s):
        flat = m.reshape(n, -1)
        return ~(np.isfinite(flat).all(axis=1) & np.isfinite(s.reshape(n, -1)).all(axis=1))

    ref_bad, cand_bad = bad(ref_maps, ref_scores), bad(maps, scores)
    both_finite = ~(ref_bad | cand_bad)
    pearson, constant = [], []
    for i in range(n):
        if not both_finite[i]:
            pearson.append(0.0)
            continue
        classes = range(ref_maps.shape[1])
        per_class = [map_pearson(ref_maps[i, k], maps[i, k]) for k in classes]
        if any(is_flat(ref_maps[i, k]) != is_flat(maps[i, k]) for k in classes):
            constant.append(names[i])
        pearson.append(min(per_class))
    rows = both_finite
    map_mask = np.broadcast_to(rows.reshape(n, *([1] * (ref_maps.ndim - 1))), ref_maps.shape)
    score_mask = np.broadcast_to(rows.reshape(n, *([1] * (ref_scores.ndim - 1))), ref_scores.shape)
    per_map_range = [float(np.ptp(ref_maps[i, k])) for i in np.flatnonzero(rows) for k in range(ref_maps.shape[1])]
    rho = None
    if rows.sum() >= 3:
        per_class = [spearman(ref_scores[rows, k], scores[rows, k]) for k in range(ref_scores.shape[1])]
        rho = None if any(r is None for r in per_class) else min(per_class)
    return Comparison(
        images=n, names=names,
        anomaly_map=_error(ref_maps, maps, map_mask), image_score=_error(ref_scores, scores, score_mask),
        map_range=max(per_map_range, default=0.0),
        map_pearson=[round(p, 7) for p in pearson],
        map_pearson_min=min(pearson) if pearson else None,
        map_pearson_mean=float(np.mean(pearson)) if pearson else None,
        score_spearman=rho,
        score_reference_std=float(ref_scores[rows].std(axis=0).min()) if rows.any() else 0.0,
        nonfinite_images={"reference": [names[i] for i in np.flatnonzero(ref_bad)],
                          "candidate": [names[i] for i in np.flatnonzero(cand_bad)]},
        constant_map_images=constant)


def _listed(images: list[str], limit: int = 8) -> str:
    more = f" and {len(images) - limit} more" if len(images) > limit else ""
    return ", ".join(images[:limit]) + more


def gate(comparison: Comparison, limits: GateLimits, name: str, reference: str, candidate: str) -> GateReport:
    """Hold a comparison to limits; every failure is a phrase that names the numbers (and the images)."""
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
    if limits.score_spearman_min is not None:
        if c.score_spearman is None:
            failures.append("score Spearman not computable (fewer than 3 finite verify images, or tied scores)")
        elif not c.score_spearman >= limits.score_spearman_min:
            failures.append(f"score Spearman {c.score_spearman:.4f} (need ≥ {limits.score_spearman_min}; reference "
                            f"score std {c.score_reference_std:.2e}, max|Δscore| {c.image_score.max_abs:.2e})")
    return GateReport(name=name, reference=reference, candidate=candidate, comparison=c, limits=limits,
                      passed=not failures, failures=failures)
