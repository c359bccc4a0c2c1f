"""AA-CLIP (CVPR 2025) test path: only its differences from the shared ViT (spec models.md §2).

Differences: erf-GELU in both towers (a quirk of how the official code builds the model), bicubic+antialias positional
resize, residual adapters with norm rescaling after the first vision/text blocks, four taps → ln_post → own
projections, a detection token, per-class text anchors from hand prompts + text adapters + learned projection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from clipad.runtime.errors import ClipadError

from ..checkpoints import AACLIPCheckpoint, load_aaclip
from ..prompts import aaclip_sentences
from . import vit
from .heads import BLUR_BY_DOMAIN, AACLIPHead

ADAPT_WEIGHT = 0.1   # image_adapt_weight = text_adapt_weight = 0.1
LEAKY_SLOPE = 0.01
QUICK_GELU = False   # exact erf-GELU in both towers: the official code builds a fresh CLIP without quick_gelu


def residual_adapter(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x ← 0.1·a + 0.9·x with a = LeakyReLU(x·Wᵀ) rescaled per token to ‖x‖."""
    a = F.leaky_relu(F.linear(x, weight), LEAKY_SLOPE)
    a = a * x.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return ADAPT_WEIGHT * a + (1.0 - ADAPT_WEIGHT) * x


def check_shapes(ckpt: AACLIPCheckpoint, spec) -> None:
    """Adapter shapes must fit the architecture; the first misfit is a one-line error."""
    C, W, E = spec.width, spec.text_width, spec.embed_dim
    expected = [(f"text_adapter.{i}.fc.0.weight", t, (W, W)) for i, t in enumerate(ckpt.text_adapters)]
    expected.append((f"text_adapter.{len(ckpt.text_adapters)}.fc.0.weight", ckpt.text_projection, (E, W)))
    expected += [(f"layer_adapters.{i}.fc.0.weight", t, (C, C)) for i, t in enumerate(ckpt.layer_adapters)]
    expected += [(f"seg_proj.{j}", t, (E, C)) for j, t in enumerate(ckpt.seg_proj)]
    expected.append(("det_proj", ckpt.det_proj, (E, C)))
    for name, tensor, shape in expected:
        if tuple(tensor.shape) != shape:
            raise ClipadError(f"AA-CLIP checkpoint tensor {name} has shape {list(tensor.shape)}, but {spec.name} "
                              f"needs {list(shape)}; was it trained on another backbone?")
    if len(ckpt.layer_adapters) > spec.layers or len(ckpt.text_adapters) > spec.text_layers:
        raise ClipadError(f"AA-CLIP checkpoint has more adapters than {spec.name} has blocks")


@torch.no_grad()
def text_anchors(clip, ckpt: AACLIPCheckpoint, real_names: list[str], tokenize, trace: dict | None = None):
    """Per class [t_n, t_a] → [K, 2, E] (AdaptedCLIP.encode_text + per-state mean of unit embeddings)."""

    def adapt(i, x):
        return residual_adapter(x, ckpt.text_adapters[i]) if i < len(ckpt.text_adapters) else x

    anchors = []
    for name in real_names:
        normal, abnormal = aaclip_sentences(name)
        tokens = tokenize(normal + abnormal)
        x = vit.text_forward(clip, clip.token_embedding(tokens), after_block=adapt)
        pooled = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
        emb = F.leaky_relu(F.linear(pooled, ckpt.text_projection), LEAKY_SLOPE)
        unit = vit.l2_normalize(emb)
        t_n = vit.l2_normalize(unit[: len(normal)].mean(0))
        t_a = vit.l2_normalize(unit[len(normal):].mean(0))
        anchors.append(torch.stack([t_n, t_a]))
        if trace is not None:
            trace.setdefault("sentences", []).append(normal + abnormal)
            trace.setdefault("token_ids", []).append(tokens)
            trace.setdefault("sentence_emb", []).append(emb)
    return torch.stack(anchors)


class AACLIPVision(torch.nn.Module):
    """Vision tower + adapters + taps + projections → (seg tokens per tap, detection token)."""

    def __init__(self, clip, spec, ckpt: AACLIPCheckpoint, image_size: int):
        super().__init__()
        self.visual, self.heads = clip.visual, spec.heads
        grid = spec.grid(image_size)
        self.register_buffer("positions", vit.resize_positions(
            clip.visual.positional_embedding.detach(), grid, "bicubic-antialias"))
        self.register_buffer("layer_adapters", torch.stack(ckpt.layer_adapters) if ckpt.layer_adapters
                             else torch.zeros(0, spec.width, spec.width))
        self.register_buffer("seg_proj", torch.stack(ckpt.seg_proj))
        self.register_buffer("det_proj", ckpt.det_proj.clone())
        self.relu, self.taps = ckpt.relu, spec.tap_layers

    def project(self, tokens: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.visual.ln_post(tokens), weight)
        return vit.l2_normalize(F.leaky_relu(y, LEAKY_SLOPE) if self.relu else y)

    def forward(self, pixels: torch.Tensor, trace: dict | None = None, taps: list | None = None):
        x = vit.embed_image(self.visual, pixels, self.positions)
        if trace is not None:
            trace["ln_pre_out"] = x
        tapped = []
        for i, block in enumerate(self.visual.transformer.resblocks, start=1):
            x = vit.standard_block(block, x, self.heads)
            if trace is not None and i == 1:
                trace["block1_out_pre_adapter"] = x
            if i <= self.layer_adapters.shape[0]:
                x = residual_adapter(x, self.layer_adapters[i - 1])
            if trace is not None:
                trace[f"block{i}_out"] = x
            if i in self.taps:
                tapped.append(x[:, 1:])
        seg = [self.project(t, self.seg_proj[j]) for j, t in enumerate(tapped)]
        det = self.project(tapped[-1], self.det_proj).mean(dim=1)
        if trace is not None:
            trace.update(seg_tokens=seg, det_token=det)
        if taps is not None:
            taps.extend(seg)
        return seg, det


def read_checkpoint(path: str, epoch: int | None, spec) -> AACLIPCheckpoint:
    ckpt = load_aaclip(path, epoch)
    check_shapes(ckpt, spec)
    return ckpt


def build(clip, spec, ckpt: AACLIPCheckpoint, classes, image_size: int, tokenize, sources: dict | None = None):
    """(vision, head, anchors [K, 2, E], details for the manifest)."""
    anchors = text_anchors(clip, ckpt, classes.prompt_names, tokenize)
    vision = AACLIPVision(clip, spec, ckpt, image_size)
    head = AACLIPHead(anchors, spec.grid(image_size), image_size, BLUR_BY_DOMAIN[classes.domain],
                      len(spec.tap_layers))
    details = {"checkpoint_epoch": ckpt.epoch, "relu": ckpt.relu, "blur": list(BLUR_BY_DOMAIN[classes.domain])}
    return vision, head, anchors, details
