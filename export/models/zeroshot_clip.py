"""Zero-shot CLIP baseline (no trained adapters): only its differences from the shared ViT.

Patch tokens of the last block → ln_post → proj → unit vectors; per class a normal/abnormal prompt-ensemble anchor
pair; map = softmax(logit_scale·p̂·T)[abnormal] (upsampled, σ=4 smoothing like Crane); image score from the CLS
embedding the same way.
"""
from __future__ import annotations

import torch

from ..prompts import zeroshot_sentences
from . import vit
from .heads import CRANE_FILTER_SIGMA, PairSoftmaxHead

QUICK_GELU = None   # the user's choice (--activation); QuickGELU by default, as OpenAI weights need


@torch.no_grad()
def text_anchors(clip, real_names: list[str], tokenize) -> torch.Tensor:
    anchors = []
    for name in real_names:
        normal, abnormal = zeroshot_sentences(name)
        tokens = tokenize(normal + abnormal)
        h = vit.text_forward(clip, clip.token_embedding(tokens))
        unit = vit.l2_normalize(h[torch.arange(h.shape[0]), tokens.argmax(dim=-1)] @ clip.text_projection)
        anchors.append(torch.stack([vit.l2_normalize(unit[: len(normal)].mean(0)),
                                    vit.l2_normalize(unit[len(normal):].mean(0))]))
    return torch.stack(anchors)


class ZeroShotVision(torch.nn.Module):
    def __init__(self, clip, spec, image_size: int):
        super().__init__()
        self.visual, self.heads = clip.visual, spec.heads
        self.register_buffer("positions", vit.resize_positions(
            clip.visual.positional_embedding.detach(), spec.grid(image_size), "bicubic-antialias"))

    def forward(self, pixels: torch.Tensor, trace: dict | None = None, taps: list | None = None):
        h = vit.embed_image(self.visual, pixels, self.positions)
        for block in self.visual.transformer.resblocks:
            h = vit.standard_block(block, h, self.heads)
        tokens = self.visual.ln_post(h) @ self.visual.proj
        patch_unit = vit.l2_normalize(tokens[:, 1:])
        if taps is not None:
            taps.append(patch_unit)
        return patch_unit, vit.l2_normalize(tokens[:, 0])


def read_checkpoint(path: str, epoch: int | None, spec):
    return None


def build(clip, spec, ckpt, classes, image_size: int, tokenize, sources: dict | None = None):
    """(vision, head, anchors [K, 2, E], details for the manifest)."""
    anchors = text_anchors(clip, classes.prompt_names, tokenize)
    head = PairSoftmaxHead(anchors, spec.grid(image_size), image_size, float(clip.logit_scale.exp()),
                           CRANE_FILTER_SIGMA)
    return ZeroShotVision(clip, spec, image_size), head, anchors, {}
