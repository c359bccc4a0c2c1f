"""One factory over the three model kinds: architecture config + local weights + checkpoint → an exportable module.

The module maps a uint8 NHWC RGB batch [B, S, S, 3] (already resized on the host with PIL bicubic) to
``anomaly_map`` [B, K, S, S] and ``image_score`` [B, K] float32, raw as the official test paths define them
(K = classes baked in). Text anchors and the resized positional table are buffers, i.e. constants in the graph.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from clipad.runtime.errors import ClipadError
from clipad.runtime.preprocess import OPENAI_MEAN, OPENAI_STD

from .. import archs, checkpoints, prompts, weights
from . import aaclip, crane, vit, zeroshot_clip
from .heads import BLUR_BY_DOMAIN, CRANE_FILTER_SIGMA, CRANE_TEMPERATURE, AACLIPHead, PairSoftmaxHead

MODEL_KINDS = ("aaclip", "crane", "clip")


class ExportableDetector(torch.nn.Module):
    """uint8 NHWC RGB → (anomaly_map [B, K, S, S], image_score [B, K]); normalisation happens in the graph."""

    def __init__(self, core: torch.nn.Module, image_size: int):
        super().__init__()
        self.core, self.image_size = core, image_size
        self.register_buffer("mean", torch.tensor(OPENAI_MEAN, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(OPENAI_STD, dtype=torch.float32))

    def forward(self, images: torch.Tensor):
        return self.core.forward_pixels(vit.normalize_pixels(images, self.mean, self.std))


@dataclass
class BuiltDetector:
    module: ExportableDetector
    kind: str
    arch: str
    image_size: int
    class_names: list[str]
    prompt_names: list[str]
    domain: str | None
    anchors: torch.Tensor
    info: dict = field(default_factory=dict)  # provenance for the manifest (weights format, checkpoint epoch, …)

    @property
    def anchor_sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.anchors.numpy().astype("<f4")).tobytes()).hexdigest()


def _tokenizer(spec):
    from open_clip.tokenizer import tokenize

    return lambda texts: tokenize(texts, context_length=spec.context_length)


def _resolve_classes(kind: str, class_names, dataset, domain):
    if kind == "crane":
        names = list(class_names or ["object"])
        if len(names) != 1:
            raise ClipadError("Crane's learned prompts are class-agnostic: give at most one --class-name (a label)")
        return names, names, None
    if not class_names:
        raise ClipadError(f"--class-name is required for --model {kind} (the object name used in the prompts)")
    resolved = [prompts.resolve_class(n, dataset) for n in class_names]
    prompt_names = [r[0] for r in resolved]
    if kind == "clip":
        return list(class_names), prompt_names, None
    if domain is None:
        domains = {r[1] for r in resolved}
        if len(domains) > 1:
            raise ClipadError("classes mix industrial and medical domains; pass --domain industrial|medical")
        domain = domains.pop()
    if domain not in BLUR_BY_DOMAIN:
        raise ClipadError(f"unknown domain {domain!r}; use industrial or medical")
    return list(class_names), prompt_names, domain


def build_detector(kind: str, *, arch: str = "ViT-L-14-336", image_size: int = 518, clip_weights: str | None = None,
                   random_init: bool = False, seed: int = 0, ckpt: str | None = None, epoch: int | None = None,
                   class_names: list[str] | None = None, dataset: str | None = None, domain: str | None = None,
                   quick_gelu: bool | None = None) -> BuiltDetector:
    if kind not in MODEL_KINDS:
        raise ClipadError(f"unknown model {kind!r}; choose one of {', '.join(MODEL_KINDS)}")
    if kind in ("aaclip", "crane") and not ckpt:
        raise ClipadError(f"--ckpt is required for --model {kind}")
    if not clip_weights and not random_init:
        raise ClipadError("--clip-weights is required (a local CLIP weight file, e.g. ViT-L-14-336px.pt); "
                          "or pass --random-init to try the pipeline with seeded random weights")
    spec = archs.arch_spec(arch)
    grid = spec.grid(image_size)
    names, prompt_names, domain = _resolve_classes(kind, class_names, dataset, domain)

    # Read the (small) checkpoint before the (large) base weights, so its errors come fast.
    aa_ckpt = checkpoints.load_aaclip(ckpt, epoch) if kind == "aaclip" else None
    crane_ckpt = checkpoints.load_crane(ckpt) if kind == "crane" else None
    if aa_ckpt is not None:
        aaclip.check_shapes(aa_ckpt, spec)

    # AA-CLIP builds with erf-GELU (its quirk), Crane with QuickGELU; zero-shot defaults to QuickGELU (OpenAI weights).
    act_quick = {"aaclip": False, "crane": True}.get(kind, True if quick_gelu is None else quick_gelu)
    clip = archs.build_clip(arch, quick_gelu=act_quick)
    if random_init:
        sd, fmt, source = weights.random_state_dict(clip, seed), "random-init", f"random-init(seed={seed})"
    else:
        sd, fmt = weights.read_state_dict(clip_weights)
        source = f"--clip-weights {clip_weights}"
    weights.load_into(clip, sd, arch, source)
    del sd

    info = {"weights_format": fmt, "random_init": bool(random_init), "seed": seed if random_init else None,
            "activation": "quick_gelu" if act_quick else "gelu"}
    if kind == "aaclip":
        anchors = aaclip.text_anchors(clip, aa_ckpt, prompt_names, _tokenizer(spec))
        vision = aaclip.AACLIPVision(clip, spec, aa_ckpt, image_size)
        head = AACLIPHead(anchors, grid, image_size, BLUR_BY_DOMAIN[domain])
        core = aaclip.AACLIPDetector(vision, head)
        info.update(checkpoint_epoch=aa_ckpt.epoch, relu=aa_ckpt.relu, blur=list(BLUR_BY_DOMAIN[domain]))
    elif kind == "crane":
        anchors = crane.text_anchors(clip, crane_ckpt, spec)
        vision = crane.CraneVision(clip, spec, image_size)
        head = PairSoftmaxHead(anchors, grid, image_size, 1.0 / CRANE_TEMPERATURE, CRANE_FILTER_SIGMA,
                               pooling_weight=crane.POOLING_WEIGHT)
        core = crane.CraneDetector(vision, head)
    else:
        anchors = zeroshot_clip.text_anchors(clip, prompt_names, _tokenizer(spec))
        vision = zeroshot_clip.ZeroShotVision(clip, spec, image_size)
        head = PairSoftmaxHead(anchors, grid, image_size, float(clip.logit_scale.exp()), CRANE_FILTER_SIGMA)
        core = zeroshot_clip.ZeroShotDetector(vision, head)

    module = ExportableDetector(core, image_size).eval().requires_grad_(False)
    return BuiltDetector(module=module, kind=kind, arch=arch, image_size=image_size, class_names=names,
                         prompt_names=prompt_names, domain=domain, anchors=anchors.detach().clone(), info=info)
