"""The shared CLIP transformer forward, run on open_clip's modules with explicit attention.

Attention is written as explicit matmuls with the 1/sqrt(d) scale applied to q before q·kᵀ: it exports to plain
MatMul/Softmax ONNX nodes (never the opset-23 Attention op) in the pattern TensorRT fuses. Layout is batch-first
[B, N, C]. Model files (aaclip.py, crane.py, zeroshot_clip.py) hold only their differences from this.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, C] → [B, H, N, C/H]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] → [B, N, H·D]."""
    return x.transpose(1, 2).flatten(2)


def qkv_heads(block, x_normed: torch.Tensor, heads: int):
    qkv = F.linear(x_normed, block.attn.in_proj_weight, block.attn.in_proj_bias)
    q, k, v = qkv.chunk(3, dim=-1)
    return split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax((q·s)·kᵀ [+ mask])·v with s = 1/sqrt(head_dim)."""
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores + mask
    return scores.softmax(dim=-1) @ v


def out_proj(block, heads_out: torch.Tensor) -> torch.Tensor:
    return F.linear(merge_heads(heads_out), block.attn.out_proj.weight, block.attn.out_proj.bias)


def mlp(block, x: torch.Tensor) -> torch.Tensor:
    """Residual MLP branch; the activation (erf-GELU or QuickGELU) is the one open_clip built into the block."""
    return block.mlp(block.ln_2(x))


def standard_block(block, x: torch.Tensor, heads: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    q, k, v = qkv_heads(block, block.ln_1(x), heads)
    x = x + out_proj(block, attend(q, k, v, mask))
    return x + mlp(block, x)


def resize_positions(table: torch.Tensor, grid: int, mode: str) -> torch.Tensor:
    """Resize a [1 + g², C] positional table (class row first) to [1 + grid², C], done once at build time.

    mode "bicubic-antialias": F.interpolate(bicubic, antialias=True, align_corners=False) — AA-CLIP and open_clip.
    mode "bilinear": F.interpolate(bilinear, align_corners=False, no antialias) — Crane.
    """
    cls_row, tokens = table[:1], table[1:]
    old = int(round(math.sqrt(tokens.shape[0])))
    if old * old != tokens.shape[0]:
        raise ValueError(f"positional table with {tokens.shape[0]} patch rows is not a square grid")
    if old == grid:
        return table.clone()
    img = tokens.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    if mode == "bicubic-antialias":
        img = F.interpolate(img, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    elif mode == "bilinear":
        img = F.interpolate(img, size=(grid, grid), mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"unknown positional resize mode {mode!r}")
    return torch.cat([cls_row, img.permute(0, 2, 3, 1).reshape(grid * grid, -1)], dim=0)


def embed_image(visual, pixels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Normalised pixels [B, 3, S, S] → ln_pre(tokens + positions) [B, 1 + g², C]."""
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    cls_token = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls_token, x], dim=1) + positions
    return visual.ln_pre(x)


def normalize_pixels(images_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC RGB → float32 NCHW, (x/255 − mean)/std exactly like ToTensor + Normalize.

    The Cast comes first: TensorRT accepts uint8 tensors only as the input of a Cast."""
    x = images_u8.to(torch.float32).permute(0, 3, 1, 2) / 255.0
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def causal_mask(length: int) -> torch.Tensor:
    return torch.full((length, length), float("-inf")).triu_(1)


def text_forward(clip, token_embeddings: torch.Tensor, after_block=None) -> torch.Tensor:
    """Run the causal text transformer on [B, L, W] input embeddings (positions added here).

    ``after_block(i, x)`` (0-indexed block i) lets a model adapt or overwrite tokens between blocks.
    """
    x = token_embeddings + clip.positional_embedding[: token_embeddings.shape[1]]
    mask = causal_mask(x.shape[1]).to(x.dtype)
    heads = clip.transformer.resblocks[0].attn.num_heads
    for i, block in enumerate(clip.transformer.resblocks):
        x = standard_block(block, x, heads, mask)
        if after_block is not None:
            x = after_block(i, x)
    return clip.ln_final(x)


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """x/‖x‖ over the last axis; the official code has no epsilon, this one only guards exact zeros."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
