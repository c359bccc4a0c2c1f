"""DINOv2 with registers (Meta's ``dinov2_vitb14_reg``), as Crane+ runs it, on plain torch modules: weights only from a
local state dict with Meta's key names (never downloaded), explicit-matmul attention like the CLIP tower.

Forward (spec crane_plus.md §2): 14×14 patch embedding (with bias) → CLS + pos_embed (the stored table at its own
grid; other grids are not supported) → 4 register tokens inserted after CLS (no position) → blocks
``x += ls1·attn(norm1 x); x += ls2·mlp(norm2 x)`` (erf-GELU, LayerNorm eps 1e-6) → final ``norm`` → patch tokens
(CLS and registers dropped) [B, grid², width].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clipad.runtime.errors import ClipadError

from ..weights import _draw, torch_load
from . import vit

LN_EPS = 1e-6
HEAD_WIDTH = 64            # every DINOv2 size (S/B/L/g) uses 64-wide heads
PATCH = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What Crane+ needs for each CLIP architecture: (width, blocks, registers). ViT-B/14-reg4 for the real ViT-L.
EXPECTED = {"tiny-vit": (64, 2, 4)}
DEFAULT_EXPECTED = (768, 12, 4)


def describe(width: int, depth: int, registers: int) -> str:
    size = {384: "S", 768: "B", 1024: "L", 1536: "g"}.get(width, f"{width}-wide")
    return f"DINOv2 ViT-{size}/14 with {registers} registers ({width} wide, {depth} blocks)"


def config_of(sd: dict) -> tuple[int, int, int, int]:
    """(width, depth, registers, grid) read from a state dict's shapes."""
    width = int(sd["cls_token"].shape[-1])
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    registers = int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0
    grid = int(round(math.sqrt(sd["pos_embed"].shape[1] - 1)))
    return width, depth, registers, grid


def read_dino(path: str, arch: str, grid: int) -> dict[str, torch.Tensor]:
    """Meta's ``dinov2_vitb14_reg4_pretrain.pth`` (a plain state dict), checked against what Crane+ expects."""
    sd = torch_load(path, "--dino-weights")
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or any(k not in sd for k in ("cls_token", "pos_embed", "patch_embed.proj.weight")):
        raise ClipadError(f"--dino-weights {path}: not a DINOv2 state dict (no cls_token / pos_embed / patch_embed)")
    found = config_of(sd)
    want = EXPECTED.get(arch, DEFAULT_EXPECTED)
    if found[:3] != want:
        raise ClipadError(f"--dino-weights {path}: Crane+ on {arch} needs {describe(*want)}; this file is "
                          f"{describe(*found[:3])}")
    if tuple(sd["patch_embed.proj.weight"].shape[-2:]) != (PATCH, PATCH):
        raise ClipadError(f"--dino-weights {path}: patch size {list(sd['patch_embed.proj.weight'].shape[-2:])}, "
                          f"Crane+ needs 14")
    if found[3] != grid:
        raise ClipadError(f"--dino-weights {path}: its position table is {found[3]}x{found[3]}, the image grid is "
                          f"{grid}x{grid}; export at --image-size {found[3] * PATCH}")
    expected_keys = {k for k, *_ in specs(*want, grid)}
    missing = sorted(expected_keys - set(sd))
    if missing:
        raise ClipadError(f"--dino-weights {path}: missing {missing[0]} ({len(missing)} keys missing)")
    return {k: sd[k].detach().to(torch.float32) for k in expected_keys}


def specs(width: int, depth: int, registers: int, grid: int):
    """(key, shape, mean, std) of every tensor, in Meta's order; the seeded rule of golden/make_dino_weights.py."""
    w, mlp = width, 4 * width
    out = [("cls_token", (1, 1, w), 0.0, 0.02), ("pos_embed", (1, grid * grid + 1, w), 0.0, 1.0),
           ("register_tokens", (1, registers, w), 0.0, 0.02), ("mask_token", (1, w), 0.0, 0.02),
           ("patch_embed.proj.weight", (w, 3, PATCH, PATCH), 0.0, (3 * PATCH * PATCH) ** -0.5),
           ("patch_embed.proj.bias", (w,), 0.0, 0.02)]
    for i in range(depth):
        p = f"blocks.{i}."
        out += [(p + "norm1.weight", (w,), 1.0, 0.05), (p + "norm1.bias", (w,), 0.0, 0.02),
                (p + "attn.qkv.weight", (3 * w, w), 0.0, w ** -0.5), (p + "attn.qkv.bias", (3 * w,), 0.0, 0.02),
                (p + "attn.proj.weight", (w, w), 0.0, w ** -0.5), (p + "attn.proj.bias", (w,), 0.0, 0.02),
                (p + "ls1.gamma", (w,), 0.1, 0.02), (p + "norm2.weight", (w,), 1.0, 0.05),
                (p + "norm2.bias", (w,), 0.0, 0.02), (p + "mlp.fc1.weight", (mlp, w), 0.0, w ** -0.5),
                (p + "mlp.fc1.bias", (mlp,), 0.0, 0.02), (p + "mlp.fc2.weight", (w, mlp), 0.0, mlp ** -0.5),
                (p + "mlp.fc2.bias", (w,), 0.0, 0.02), (p + "ls2.gamma", (w,), 0.1, 0.02)]
    return out + [("norm.weight", (w,), 1.0, 0.05), ("norm.bias", (w,), 0.0, 0.02)]


def random_dino(arch: str, grid: int, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights (--random-init); for ViT-L-14-336 at 518 and seed 0 exactly golden/make_dino_weights.py's."""
    return {k: torch.from_numpy(_draw("dinov2/" + k, shape, mean, std, seed))
            for k, shape, mean, std in specs(*EXPECTED.get(arch, DEFAULT_EXPECTED), grid)}


class DinoTower(torch.nn.Module):
    """Pixels normalised as for CLIP → DINOv2 patch features [B, grid², width] (final norm applied)."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        super().__init__()
        width, self.depth, self.registers, _ = config_of(sd)
        self.heads = width // HEAD_WIDTH
        for key, value in sd.items():
            if key != "mask_token":
                self.register_buffer(key.replace(".", "__"), value.clone())
        self.register_buffer("imagenet_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("imagenet_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def _p(self, key: str) -> torch.Tensor:
        return getattr(self, key.replace(".", "__"))

    def prepare_input(self, clip_pixels: torch.Tensor, clip_mean: torch.Tensor, clip_std: torch.Tensor):
        """Official: clamp(x·std_openai + mean_openai, 0, 1), then ImageNet normalisation."""
        raw = (clip_pixels * clip_std.view(1, 3, 1, 1) + clip_mean.view(1, 3, 1, 1)).clamp(0.0, 1.0)
        return (raw - self.imagenet_mean) / self.imagenet_std

    def forward(self, pixels: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        p = self._p
        x = F.conv2d(pixels, p("patch_embed.proj.weight"), p("patch_embed.proj.bias"), stride=PATCH)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([p("cls_token").expand(x.shape[0], -1, -1), x], dim=1) + p("pos_embed")
        x = torch.cat([x[:, :1], p("register_tokens").expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        if trace is not None:
            trace["dino_prepared"] = x
        width = x.shape[-1]
        for i in range(self.depth):
            b = f"blocks.{i}."
            h = F.layer_norm(x, (width,), p(b + "norm1.weight"), p(b + "norm1.bias"), LN_EPS)
            q, k, v = F.linear(h, p(b + "attn.qkv.weight"), p(b + "attn.qkv.bias")).chunk(3, dim=-1)
            a = vit.attend(*(vit.split_heads(t, self.heads) for t in (q, k, v)))
            x = x + p(b + "ls1.gamma") * F.linear(vit.merge_heads(a), p(b + "attn.proj.weight"), p(b + "attn.proj.bias"))
            h = F.layer_norm(x, (width,), p(b + "norm2.weight"), p(b + "norm2.bias"), LN_EPS)
            h = F.linear(F.gelu(F.linear(h, p(b + "mlp.fc1.weight"), p(b + "mlp.fc1.bias"))),
                         p(b + "mlp.fc2.weight"), p(b + "mlp.fc2.bias"))
            x = x + p(b + "ls2.gamma") * h
            if trace is not None:
                trace[f"dino_block{i + 1}_out"] = x
        x = F.layer_norm(x, (width,), p("norm.weight"), p("norm.bias"), LN_EPS)
        return x[:, 1 + self.registers:]
