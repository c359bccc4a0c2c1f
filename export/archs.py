"""Architecture configurations: open_clip's own configs plus tiny ones for fast tests.

Everything shape-related derives from the config (width, depth, heads, embed dim, patch size), so the same code runs a
tiny test configuration in seconds and ViT-L-14-336 at 518 px for real.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from clipad.runtime.errors import ClipadError

# Small configurations of the same CLIP ViT family for tests (shapes only; the code path is identical).
TINY_CONFIGS = {
    "tiny-vit": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 56, "layers": 4, "width": 64, "head_width": 16, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 4},
    },
}


def model_config(arch: str) -> dict:
    """The open_clip config dict of ``arch`` (open_clip built-ins or our tiny test configs)."""
    if arch in TINY_CONFIGS:
        return copy.deepcopy(TINY_CONFIGS[arch])
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ClipadError(f"unknown architecture {arch!r}; try one of: ViT-L-14-336, ViT-L-14, ViT-B-16, ViT-B-32")
    return cfg


@dataclass(frozen=True)
class ArchSpec:
    """The numbers our models need, derived from one open_clip config."""

    name: str
    embed_dim: int
    width: int
    layers: int
    heads: int
    patch_size: int
    base_image_size: int
    text_width: int
    text_layers: int
    text_heads: int
    context_length: int

    def grid(self, image_size: int) -> int:
        if image_size % self.patch_size:
            raise ClipadError(
                f"image size {image_size} is not a multiple of the patch size {self.patch_size} of {self.name}")
        return image_size // self.patch_size

    @property
    def tap_layers(self) -> tuple[int, ...]:
        """1-indexed blocks at quarter depths (6, 12, 18, 24 for a 24-layer ViT), as AA-CLIP and Crane use."""
        q = self.layers / 4
        return tuple(int(round(q * i)) for i in range(1, 5))


def arch_spec(arch: str) -> ArchSpec:
    cfg = model_config(arch)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    unsupported = [k for k in ("timm_model_name", "attentional_pool", "no_ln_pre", "final_ln_after_pool",
                               "qk_norm", "scaled_cosine_attn", "ls_init_value", "hf_model_name")
                   if v.get(k) or t.get(k)]
    if isinstance(v.get("layers"), (list, tuple)) or unsupported or v.get("pool_type", "tok") != "tok" \
            or v.get("pos_embed_type", "learnable") != "learnable" or t.get("pool_type", "argmax") != "argmax":
        raise ClipadError(f"architecture {arch!r} is not a plain CLIP ViT (class token, learnable positions); "
                          f"unsupported: {unsupported or 'tower type'}")
    image_size = v.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if image_size[0] != image_size[1]:
            raise ClipadError(f"architecture {arch!r} has a non-square input; only square inputs are supported")
        image_size = image_size[0]
    width = v.get("width", 768)
    return ArchSpec(
        name=arch, embed_dim=cfg["embed_dim"], width=width, layers=v.get("layers", 12),
        heads=width // v.get("head_width", 64), patch_size=v.get("patch_size", 16), base_image_size=image_size,
        text_width=t.get("width", 512), text_layers=t.get("layers", 12), text_heads=t.get("heads", 8),
        context_length=t.get("context_length", 77),
    )


def build_clip(arch: str, quick_gelu: bool):
    """An open_clip ``CLIP`` module at the architecture's native image size (weights are loaded separately)."""
    from open_clip.model import CLIP

    arch_spec(arch)  # validates the tower type
    cfg = model_config(arch)
    cfg.pop("quick_gelu", None)
    for key in ("custom_text", "init_logit_bias"):
        cfg.pop(key, None)
    model = CLIP(**cfg, quick_gelu=quick_gelu)
    return model.eval().requires_grad_(False)
