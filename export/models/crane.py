"""Crane (2025), published "Crane" test configuration: only its differences from the shared ViT (models.md §3).

Differences: QuickGELU, bilinear positional resize, E-Attn (softmax(vvᵀ)+softmax(kkᵀ)+softmax(qqᵀ))·v in parallel to the
unchanged blocks of the last 19 layers, accumulated into one stream Z (the official taps are aliases of it), CLIP's
own ln_post/proj on Z and on the CLS token, learned prompts → one anchor pair, score-based pooling.
"""
from __future__ import annotations

import torch

from clipad.runtime.errors import ClipadError

from ..checkpoints import CraneCheckpoint, load_crane
from . import vit
from .heads import CRANE_FILTER_SIGMA, CRANE_TEMPERATURE, PairSoftmaxHead

POOLING_WEIGHT = 0.5  # ScoreBasePooling: g' = normalize(0.5·f + 0.5·ĝ)
QUICK_GELU = True


def eattn_layers(depth: int) -> int:
    """The official replace_with_EAttn(to_layer=20) rewires the last 19 of 24 blocks; scaled for other depths."""
    return max(1, min(depth - 1, round(depth * 19 / 24)))


@torch.no_grad()
def text_anchors(clip, ckpt: CraneCheckpoint, spec, trace: dict | None = None) -> torch.Tensor:
    """Learned prompts → T = normalize([t_n, t_a]) as [1, 2, E]. The stored prefix/suffix token embeddings are used
    as stored (they come from the real CLIP vocabulary), compound prompts are rounded to float16 like the official
    code, and overwrite the first context slots before text blocks 2 … 1 + len(compound)."""
    p = ckpt.prompts
    width = spec.text_width
    sequences = []
    for side in ("pos", "neg"):
        parts = [p[f"token_prefix_{side}"], p[f"ctx_{side}"], p[f"token_suffix_{side}"]]
        for part, name in zip(parts, ("token_prefix", "ctx", "token_suffix")):
            if part.shape[-1] != width:
                raise ClipadError(f"{ckpt.path}: {name}_{side} has width {part.shape[-1]}, {spec.name} text width "
                                  f"is {width}")
        seq = torch.cat([t.to(torch.float32).reshape(-1, width) for t in parts])
        if seq.shape[0] != spec.context_length:
            raise ClipadError(f"{ckpt.path}: prompt length {seq.shape[0]} != context length {spec.context_length}")
        sequences.append(seq)
    x = torch.stack(sequences)
    n_ctx = p["ctx_pos"].reshape(-1, width).shape[0]
    if len(ckpt.compound) >= spec.text_layers:
        raise ClipadError(f"{ckpt.path}: {len(ckpt.compound)} compound prompts for {spec.text_layers} text blocks")
    for i, c in enumerate(ckpt.compound):
        if c.ndim != 2 or c.shape[1] != width or c.shape[0] > n_ctx:
            raise ClipadError(f"{ckpt.path}: compound_prompts_text.{i} has shape {list(c.shape)}, expected "
                              f"[≤{n_ctx}, {width}]")
    compound = [c.half().to(torch.float32) for c in ckpt.compound]

    def overwrite(i, h):
        if i < len(compound):
            ctx = compound[i].unsqueeze(0).expand(h.shape[0], -1, -1)
            h = torch.cat([h[:, :1], ctx, h[:, 1 + ctx.shape[1]:]], dim=1)
        return h

    ids = torch.stack([p["tokenized_prompts_pos"].reshape(-1), p["tokenized_prompts_neg"].reshape(-1)]).long()
    h = vit.text_forward(clip, x, after_block=overwrite)
    raw = h[torch.arange(2), ids.argmax(dim=-1)] @ clip.text_projection
    if trace is not None:
        trace.update(text_raw=raw, prompt_token_ids=ids)
    return vit.l2_normalize(raw).unsqueeze(0)


class CraneVision(torch.nn.Module):
    """Vision tower with E-Attn → (unit patch features from Z, unit CLIP image embedding from H_L's CLS)."""

    def __init__(self, clip, spec, image_size: int):
        super().__init__()
        self.visual, self.heads = clip.visual, spec.heads
        self.register_buffer("positions", vit.resize_positions(
            clip.visual.positional_embedding.detach(), spec.grid(image_size), "bilinear"))
        self.first_eattn = spec.layers - eattn_layers(spec.layers) + 1  # 1-indexed; 6 for ViT-L

    def forward(self, pixels: torch.Tensor, trace: dict | None = None, taps: list | None = None):
        h = vit.embed_image(self.visual, pixels, self.positions)
        if trace is not None:
            trace["ln_pre_out"] = h
        z = None
        for i, block in enumerate(self.visual.transformer.resblocks, start=1):
            if i < self.first_eattn:
                h = vit.standard_block(block, h, self.heads)
            else:
                q, k, v = vit.qkv_heads(block, block.ln_1(h), self.heads)
                e = vit.out_proj(block, vit.attend(v, v, v) + vit.attend(k, k, v) + vit.attend(q, q, v))
                z = (h if z is None else z) + e
                h = h + vit.out_proj(block, vit.attend(q, k, v))
                h = h + vit.mlp(block, h)
            if trace is not None:
                trace[f"H{i}"] = h
                if z is not None:
                    trace[f"Z{i}"] = z
        visual = self.visual
        image_raw = visual.ln_post(h[:, 0]) @ visual.proj
        patch_raw = visual.ln_post(z[:, 1:]) @ visual.proj
        if trace is not None:
            trace.update(image_feature_raw=image_raw, patch_feature_raw=patch_raw)
        patch_unit = vit.l2_normalize(patch_raw)
        if taps is not None:
            taps.append(patch_unit)
        return patch_unit, vit.l2_normalize(image_raw)


def read_checkpoint(path: str, epoch: int | None, spec) -> CraneCheckpoint:
    return load_crane(path)


def build(clip, spec, ckpt: CraneCheckpoint, classes, image_size: int, tokenize, sources: dict | None = None):
    """(vision, head, anchors [1, 2, E], details for the manifest); the prompts are learned, no tokenizer."""
    anchors = text_anchors(clip, ckpt, spec)
    head = PairSoftmaxHead(anchors, spec.grid(image_size), image_size, 1.0 / CRANE_TEMPERATURE, CRANE_FILTER_SIGMA,
                           pooling_weight=POOLING_WEIGHT)
    return CraneVision(clip, spec, image_size), head, anchors, {}
