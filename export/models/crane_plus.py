"""Crane+ (2025): Crane plus D-Attn, an attention over the CLIP patches guided by DINOv2 features; only its
differences from Crane (spec crane_plus.md, which takes precedence over models.md §3.5).

At the last block L (the only tap, features_list [24]): S = F̂ᵀF̂ the cosine similarities of the DINOv2 patch
features, S' = 3·(S − 1.2·mean(S)) with the mean **per image** (the official code takes it over the whole batch; per
image equals it at batch 1 and is what a deployment needs), entries with S' < 0 masked out with the diagonal always
kept (the official code gives NaN rows when everything is masked), W = row softmax, one matrix shared by all heads.
D = (W·V)·W_oᵀ + b_o with V the value projection of ln_1ᴸ(H_{L−1} + O_L), the mid-block state the official code
reads through an in-place update. The head averages the D-Attn and E-Attn logits (soft_mean False).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from clipad.runtime.errors import ClipadError
from clipad.runtime.preprocess import OPENAI_MEAN, OPENAI_STD

from ..checkpoints import CraneCheckpoint, load_crane
from . import dinov2, vit
from .crane import CraneVision, text_anchors
from .heads import CRANE_FILTER_SIGMA, CRANE_TEMPERATURE, TwoMapPairSoftmaxHead

QUICK_GELU = True
BETA, GAMMA = 1.2, 3.0
POOLING_WEIGHT = 0.5


def read_checkpoint(path: str, epoch: int | None, spec) -> CraneCheckpoint:
    return load_crane(path)


class DAttnWeights(torch.nn.Module):
    """DINOv2 features [B, P, C] → the D-Attn matrix W [B, P, P]; kept FP32 in every precision (scope name)."""

    def forward(self, features: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        unit = vit.l2_normalize(features)
        sim = unit @ unit.transpose(1, 2)
        # mean(S) = |Σ_i f̂_i|² / P²: exact, O(P·C), and free of the float32 drift of a 1.87M-element ReduceMean
        # (ONNX Runtime's moved the threshold by 1.4e-6 and flipped 14 mask entries of golden image 0)
        total = unit.sum(dim=1, keepdim=True)
        mean = (total * total).sum(dim=-1, keepdim=True) / float(sim.shape[-1]) ** 2
        shifted = (sim - BETA * mean) * GAMMA
        # The diagonal from int64 indices: torch.eye exports (at 1369 patches, too big to fold) as a uint16 arange,
        # an initializer type TensorRT cannot import.
        index = torch.arange(sim.shape[-1], device=sim.device)
        eye = index[:, None] == index[None, :]
        masked = torch.where((shifted < 0) & ~eye, torch.full_like(shifted, float("-inf")), shifted)
        weights = masked.softmax(dim=-1)
        if trace is not None:
            trace.update(dattn_sim_mean=mean.flatten(), dattn_shifted=shifted, dattn_keep_mask=shifted >= 0,
                         dattn_weights=weights)
        return weights


class CranePlusVision(CraneVision):
    """Crane's tower with E-Attn, plus the DINOv2 tower and D-Attn at the last block →
    (unit D-Attn patch features, unit E-Attn patch features, unit image embedding)."""

    def __init__(self, clip, spec, image_size: int, dino_sd: dict[str, torch.Tensor]):
        super().__init__(clip, spec, image_size)
        self.dino = dinov2.DinoTower(dino_sd)
        self.dattn_weights = DAttnWeights()
        self.register_buffer("clip_mean", torch.tensor(OPENAI_MEAN, dtype=torch.float32))
        self.register_buffer("clip_std", torch.tensor(OPENAI_STD, dtype=torch.float32))

    def forward(self, pixels: torch.Tensor, trace: dict | None = None, taps: list | None = None):
        features = self.dino(self.dino.prepare_input(pixels, self.clip_mean, self.clip_std), trace)
        weights = self.dattn_weights(features, trace)
        h = vit.embed_image(self.visual, pixels, self.positions)
        z = mid = None
        blocks = self.visual.transformer.resblocks
        for i, block in enumerate(blocks, start=1):
            if i < self.first_eattn:
                h = vit.standard_block(block, h, self.heads)
                continue
            q, k, v = vit.qkv_heads(block, block.ln_1(h), self.heads)
            e = vit.out_proj(block, vit.attend(v, v, v) + vit.attend(k, k, v) + vit.attend(q, q, v))
            z = (h if z is None else z) + e
            o = vit.out_proj(block, vit.attend(q, k, v))
            if i == len(blocks):
                mid = h + o        # H_{L-1} + O_L: what the official D-Attn reads (in-place update)
                if trace is not None:
                    trace["H23"], trace["dattn_layer_input"] = h, mid
            h = h + o
            h = h + vit.mlp(block, h)
        last = blocks[-1]
        width = mid.shape[-1]
        u = last.ln_1(mid)
        value = F.linear(u, last.attn.in_proj_weight[2 * width:], last.attn.in_proj_bias[2 * width:])[:, 1:]
        dattn = F.linear(weights @ value, last.attn.out_proj.weight, last.attn.out_proj.bias)
        visual = self.visual
        d_raw = visual.ln_post(dattn) @ visual.proj
        e_raw = visual.ln_post(z[:, 1:]) @ visual.proj
        image_raw = visual.ln_post(h[:, 0]) @ visual.proj
        if trace is not None:
            trace.update(dino_features=features, dattn_ln1=u, dattn_out=dattn, H24=h, Z24=z,
                         dattn_feature_raw=d_raw, eattn_feature_raw=e_raw, image_feature_raw=image_raw)
        d_unit, e_unit = vit.l2_normalize(d_raw), vit.l2_normalize(e_raw)
        if taps is not None:
            taps.extend([d_unit, e_unit, vit.l2_normalize(features)])   # D-Attn, E-Attn, DINOv2 (AnomalyDINO)
        return d_unit, e_unit, vit.l2_normalize(image_raw)


def build(clip, spec, ckpt: CraneCheckpoint, classes, image_size: int, tokenize, sources: dict):
    """(vision, head, anchors [1, 2, E], details); ``sources``: dino_weights path or random_init + seed."""
    grid = spec.grid(image_size)
    if sources.get("random_init"):
        dino_sd = dinov2.random_dino(spec.name, grid, sources.get("seed", 0))
        details = {"dino_weights": "random-init"}
    elif sources.get("dino_weights"):
        dino_sd = dinov2.read_dino(sources["dino_weights"], spec.name, grid)
        details = {"dino_weights": "state-dict"}
    else:
        raise ClipadError("--dino-weights is required for --model crane_plus (Meta's dinov2_vitb14_reg4_pretrain.pth, "
                          "a local file); or --random-init")
    anchors = text_anchors(clip, ckpt, spec)
    head = TwoMapPairSoftmaxHead(anchors, grid, image_size, 1.0 / CRANE_TEMPERATURE, CRANE_FILTER_SIGMA,
                                 POOLING_WEIGHT)
    details.update(dattn={"beta": BETA, "gamma": GAMMA, "mean": "per image", "diagonal": "always kept"},
                   soft_mean=False)
    return CranePlusVision(clip, spec, image_size, dino_sd), head, anchors, details
