"""Anomaly-map and image-score math shared by every model; this is what the exported graph ends with.

All of it stays float32 in every precision (similarities, softmax, blur and resize are tiny and precision-sensitive).
Borders are padded with a constant-index Gather built with numpy.pad's index map, so torch "reflect" (AA-CLIP's kornia
blur) and scipy's half-sample "symmetric" (Crane's gaussian_filter) are both exact and export as one Gather per axis.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .vit import l2_normalize

AACLIP_SIMILARITY_SCALE = 100.0   # hard-coded in AA-CLIP's calculate_similarity_map (not logit_scale)
CRANE_TEMPERATURE = 0.07          # hard-coded in Crane's calc_similarity_logits
CRANE_FILTER_SIGMA = 4.0          # Crane test.py --sigma
SCIPY_TRUNCATE = 4.0              # scipy.ndimage.gaussian_filter default

BLUR_BY_DOMAIN = {"industrial": (7, 1.0), "medical": (9, 1.5)}  # AA-CLIP kornia gaussian_blur2d (kernel, sigma)


def kornia_gaussian_taps(kernel_size: int, sigma: float) -> np.ndarray:
    """kornia.filters.get_gaussian_kernel1d: exp(−x²/2σ²) at x = −k//2 … k//2, normalised."""
    x = np.arange(kernel_size, dtype=np.float64) - kernel_size // 2
    if kernel_size % 2 == 0:
        x = x + 0.5
    w = np.exp(-(x ** 2) / (2.0 * sigma ** 2))
    return (w / w.sum()).astype(np.float32)


def scipy_gaussian_taps(sigma: float, truncate: float = SCIPY_TRUNCATE) -> np.ndarray:
    """scipy.ndimage._gaussian_kernel1d (order 0): radius = int(truncate·σ + 0.5), 33 taps for σ = 4."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 / sigma ** 2 * x ** 2)
    return (w / w.sum()).astype(np.float32)


def pad_index(length: int, radius: int, mode: str) -> torch.Tensor:
    """Source index of every padded position; mode is numpy.pad's ('reflect' = torch reflect, 'symmetric' = scipy)."""
    return torch.from_numpy(np.pad(np.arange(length), radius, mode=mode).astype(np.int64))


class SeparableBlur(torch.nn.Module):
    """Separable Gaussian on [B, K, H, W] (H = W = size): rows then columns, borders by constant Gather."""

    def __init__(self, taps: np.ndarray, size: int, border: str):
        super().__init__()
        radius = len(taps) // 2
        self.register_buffer("taps_h", torch.from_numpy(taps).view(1, 1, -1, 1).clone())
        self.register_buffer("taps_w", torch.from_numpy(taps).view(1, 1, 1, -1).clone())
        self.register_buffer("index", pad_index(size, radius, border))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, k, h, w = x.shape
        x = x.reshape(-1, 1, h, w)
        x = F.conv2d(x.index_select(2, self.index), self.taps_h)
        x = F.conv2d(x.index_select(3, self.index), self.taps_w)
        return x.reshape(b, k, h, w)


def grid_to_square(x: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, P, K] per-patch values → [B, K, g, g] (patch p at row p // g, column p % g)."""
    return x.transpose(1, 2).unflatten(-1, (grid, grid))


def pair_similarity(tokens: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """[B, P, D] · [K, 2, D] → [B, P, K, 2] as one MatMul (TensorRT handles Einsum only partly)."""
    return (tokens @ anchors.flatten(0, 1).T).unflatten(-1, (anchors.shape[0], 2))


def upsample(x: torch.Tensor, size: int, align_corners: bool) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=align_corners)


class AACLIPHead(torch.nn.Module):
    """AA-CLIP test path: Σ_taps (100·S·T)[abn] + 1 − (…)[nrm]) / 2 → kornia blur (reflect) → bilinear (corners) ;
    image score (d·t_a + 1)/2. Blur and upsample are linear, so the taps are summed first (one blur, one resize)."""

    def __init__(self, anchors: torch.Tensor, grid: int, image_size: int, blur: tuple[int, float], taps: int = 4):
        super().__init__()
        self.register_buffer("anchors", anchors.clone())  # [K, 2, D]: normal, abnormal
        self.grid, self.image_size, self.taps = grid, image_size, taps
        self.blur = SeparableBlur(kornia_gaussian_taps(*blur), grid, "reflect")

    def to_image(self, grid_maps: torch.Tensor) -> torch.Tensor:
        """[B, K, g, g] per-patch values → [B, K, S, S] as this head does it: blur on the grid, then resize."""
        return upsample(self.blur(grid_maps), self.image_size, align_corners=True)

    def map_probability(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """The map as an anomaly probability: each tap adds (100·Δ + 1)/2 with Δ = cos(abnormal) − cos(normal), so
        (2·map − T)/T is the taps' mean logit difference and its sigmoid the 2-way softmax of the mean logits."""
        return torch.sigmoid((2.0 * anomaly_map - self.taps) / self.taps)

    def level_maps(self, seg_tokens: list[torch.Tensor]) -> torch.Tensor:
        """Per tap, [T, B, K, g, g]: the input of the official blur."""
        maps = []
        for tokens in seg_tokens:
            logits = AACLIP_SIMILARITY_SCALE * pair_similarity(tokens, self.anchors)
            maps.append(grid_to_square((logits[..., 1] + 1.0 - logits[..., 0]) / 2.0, self.grid))
        return torch.stack(maps)

    def forward(self, seg_tokens: list[torch.Tensor], det_token: torch.Tensor, trace: dict | None = None):
        level = self.level_maps(seg_tokens)
        anomaly_map = self.to_image(level.sum(dim=0))
        image_score = (det_token @ self.anchors[:, 1].T + 1.0) / 2.0
        if trace is not None:
            trace["level_maps_preblur"] = level
        return anomaly_map, image_score


class TwoMapPairSoftmaxHead(torch.nn.Module):
    """Crane+ with soft_mean False: the logits of two patch maps (D-Attn, E-Attn) averaged, bilinear (half-pixel) to
    the image, then the 2-way softmax (= sigmoid of the upsampled logit difference, upsampling being linear), then the
    scipy-style Gaussian. Image score: score-based pooling with π = softmax of the averaged logits over the mean of
    the two unit maps p̄ (not renormalised): ĝ' = normalize(w·normalize(Σ_p π_p p̄_p) + (1 − w)·ĝ)."""

    def __init__(self, anchors: torch.Tensor, grid: int, image_size: int, scale: float, sigma: float,
                 pooling_weight: float):
        super().__init__()
        self.register_buffer("anchors", anchors.clone())  # [K, 2, D]
        self.scale, self.grid, self.image_size, self.pooling_weight = float(scale), grid, image_size, pooling_weight
        self.smooth = SeparableBlur(scipy_gaussian_taps(sigma), image_size, "symmetric")

    def to_image(self, grid_maps: torch.Tensor) -> torch.Tensor:
        """[B, K, g, g] → [B, K, S, S] as this head does it: bilinear (half-pixel), then the Gaussian."""
        return self.smooth(upsample(grid_maps, self.image_size, align_corners=False))

    def map_probability(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        return anomaly_map   # already a (smoothed) probability

    def map_from_logits(self, mean_logits: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        """[B, P, K, 2] averaged logits → [B, K, S, S] map."""
        difference = grid_to_square(mean_logits[..., 1] - mean_logits[..., 0], self.grid)
        prefilter = torch.sigmoid(upsample(difference, self.image_size, align_corners=False))
        if trace is not None:
            trace["anomaly_map_prefilter"] = prefilter
        return self.smooth(prefilter)

    def forward(self, d_unit: torch.Tensor, e_unit: torch.Tensor, global_unit: torch.Tensor,
                trace: dict | None = None):
        d_logits = pair_similarity(d_unit, self.anchors) * self.scale               # [B, P, K, 2]
        e_logits = pair_similarity(e_unit, self.anchors) * self.scale
        mean_logits = (d_logits + e_logits) / 2.0
        anomaly_map = self.map_from_logits(mean_logits, trace)
        prob = mean_logits.softmax(dim=-1)[..., 1]                                    # [B, P, K]
        pooled = l2_normalize(prob.transpose(1, 2) @ ((d_unit + e_unit) / 2.0))       # [B, K, D]
        fused = l2_normalize(self.pooling_weight * pooled + (1.0 - self.pooling_weight) * global_unit.unsqueeze(1))
        image_logits = (fused.unsqueeze(2) * self.anchors).sum(-1) * self.scale       # [B, K, 2]
        if trace is not None:
            trace.update(dattn_logits=d_logits, eattn_logits=e_logits, prob_map_grid=grid_to_square(prob, self.grid),
                         pooled_feature=pooled, image_feature_fused=fused, image_logits=image_logits)
        return anomaly_map, image_logits.softmax(dim=-1)[..., 1]


class PairSoftmaxHead(torch.nn.Module):
    """Crane / zero-shot CLIP: π = softmax(p̂·Tᵀ·scale)[abn] on the grid → bilinear (half-pixel) → scipy-style
    Gaussian (symmetric border). Image score = softmax(ĝ'·Tᵀ·scale)[abn]; with ``pooling_weight`` w (Crane's
    score-based pooling) ĝ' = normalize(w·normalize(Σ_p π_p p̂_p) + (1 − w)·ĝ), else ĝ' = ĝ."""

    def __init__(self, anchors: torch.Tensor, grid: int, image_size: int, scale: float, sigma: float | None,
                 pooling_weight: float | None = None):
        super().__init__()
        self.register_buffer("anchors", anchors.clone())  # [K, 2, D]
        self.scale, self.grid, self.image_size = float(scale), grid, image_size
        self.pooling_weight = pooling_weight
        self.smooth = SeparableBlur(scipy_gaussian_taps(sigma), image_size, "symmetric") if sigma else None

    def to_image(self, grid_maps: torch.Tensor) -> torch.Tensor:
        """[B, K, g, g] → [B, K, S, S] as this head does it: bilinear (half-pixel), then the Gaussian if any."""
        image = upsample(grid_maps, self.image_size, align_corners=False)
        return self.smooth(image) if self.smooth is not None else image

    def map_probability(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        return anomaly_map   # already a (smoothed) probability

    def forward(self, patch_unit: torch.Tensor, global_unit: torch.Tensor, trace: dict | None = None):
        logits = pair_similarity(patch_unit, self.anchors) * self.scale              # [B, P, K, 2]
        prob = logits.softmax(dim=-1)[..., 1]                                           # [B, P, K]
        grid_map = grid_to_square(prob, self.grid)
        anomaly_map = upsample(grid_map, self.image_size, align_corners=False)
        if trace is not None:
            trace.update(pixel_logits=logits, prob_map_grid=grid_map, anomaly_map_prefilter=anomaly_map)
        if self.smooth is not None:
            anomaly_map = self.smooth(anomaly_map)

        fused = global_unit.unsqueeze(1).expand(-1, self.anchors.shape[0], -1)          # [B, K, D]
        if self.pooling_weight is not None:
            pooled = l2_normalize(prob.transpose(1, 2) @ patch_unit)
            fused = l2_normalize(self.pooling_weight * pooled + (1.0 - self.pooling_weight) * fused)
            if trace is not None:
                trace.update(pooled_feature=pooled, image_feature_fused=fused)
        image_logits = (fused.unsqueeze(2) * self.anchors).sum(-1) * self.scale       # [B, K, 2]
        if trace is not None:
            trace["image_logits"] = image_logits
        return anomaly_map, image_logits.softmax(dim=-1)[..., 1]
