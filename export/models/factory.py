"""One factory over the model kinds of ``registry``: architecture config + local weights + checkpoint → an exportable
module.

The module maps a uint8 NHWC RGB batch [B, S, S, 3] (already resized on the host with PIL bicubic) to
``anomaly_map`` [B, K, S, S] and ``image_score`` [B, K] float32, raw as the official test paths define them
(K = classes baked in). Text anchors and the resized positional table are buffers, i.e. constants in the graph.

A model file provides ``QUICK_GELU`` (True/False, or None for the user's --activation), ``read_checkpoint(path,
epoch, spec)`` and ``build(clip, spec, checkpoint, classes, image_size, tokenize, sources) -> (vision, head,
anchors, details)`` (``sources``: random_init, seed and extra weight files such as dino_weights); every model is
then ``head(*vision(pixels))``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from clipad.runtime.errors import ClipadError
from clipad.runtime.preprocess import OPENAI_MEAN, OPENAI_STD

from .. import archs, prompts, weights
from . import vit
from .heads import BLUR_BY_DOMAIN
from .registry import ModelKind, get_kind, model_module


class AnomalyDetector(torch.nn.Module):
    """Every model kind: a vision tower whose outputs feed a head. ``trace`` collects intermediates for tests."""

    def __init__(self, kind: str, vision: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.kind, self.vision, self.head = kind, vision, head

    def forward_pixels(self, pixels: torch.Tensor, trace: dict | None = None, taps: list | None = None):
        """``taps``, when a list, receives the unit patch features [B, P, C_t] a few-shot memory compares."""
        return self.head(*self.vision(pixels, trace, taps), trace)


def stack_taps(taps: list[torch.Tensor]) -> torch.Tensor:
    """[B, P, C_t] per tap → [B, T, P, C], narrower taps zero-padded to the widest (cosines are unchanged: the
    padding is zero in the memory too)."""
    width = max(t.shape[-1] for t in taps)
    return torch.stack([torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in taps], dim=1)


class ExportableDetector(torch.nn.Module):
    """uint8 NHWC RGB → (anomaly_map [B, K, S, S], image_score [B, K]); normalisation happens in the graph. With
    ``memory_features`` also patch_features [B, T, P, C]: the unit patch tokens a few-shot memory compares."""

    def __init__(self, core: torch.nn.Module, image_size: int, memory_features: bool = False):
        super().__init__()
        self.core, self.image_size, self.memory_features = core, image_size, memory_features
        self.register_buffer("mean", torch.tensor(OPENAI_MEAN, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(OPENAI_STD, dtype=torch.float32))

    def forward(self, images: torch.Tensor):
        pixels = vit.normalize_pixels(images, self.mean, self.std)
        if not self.memory_features:
            return self.core.forward_pixels(pixels)
        taps: list[torch.Tensor] = []
        anomaly_map, image_score = self.core.forward_pixels(pixels, None, taps)
        return anomaly_map, image_score, stack_taps(taps)


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
    decision_score: str = "image_score"   # the runtime's OK/NG decision-score rule for this model
    random_init: bool = False
    info: dict = field(default_factory=dict)  # provenance for the manifest (weights format, checkpoint epoch, …)

    @property
    def anchor_sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.anchors.numpy().astype("<f4")).tobytes()).hexdigest()


def _tokenizer(spec):
    from open_clip.tokenizer import tokenize

    return lambda texts: tokenize(texts, context_length=spec.context_length)


@dataclass
class ClassSetup:
    class_names: list[str]     # output channel k = k-th name
    prompt_names: list[str]    # what goes into the prompts (AA-CLIP's descriptions for official names)
    domain: str | None         # AA-CLIP blur domain


def _resolve_classes(kind: ModelKind, class_names, dataset, domain) -> ClassSetup:
    if not kind.prompted_classes:
        names = list(class_names or ["object"])
        if len(names) != 1:
            raise ClipadError(f"{kind.name}'s learned prompts are class-agnostic: give at most one --class-name "
                              f"(a label)")
        return ClassSetup(names, names, None)
    if not class_names:
        raise ClipadError(f"--class-name is required for --model {kind.name} (the object name used in the prompts)")
    resolved = [prompts.resolve_class(n, dataset) for n in class_names]
    prompt_names = [r[0] for r in resolved]
    if not kind.uses_domain:
        return ClassSetup(list(class_names), prompt_names, None)
    if domain is None:
        domains = {r[1] for r in resolved}
        if len(domains) > 1:
            raise ClipadError("classes mix industrial and medical domains; pass --domain industrial|medical")
        domain = domains.pop()
    if domain not in BLUR_BY_DOMAIN:
        raise ClipadError(f"unknown domain {domain!r}; use industrial or medical")
    return ClassSetup(list(class_names), prompt_names, domain)


def build_detector(kind: str, *, arch: str = "ViT-L-14-336", image_size: int = 518, clip_weights: str | None = None,
                   random_init: bool = False, seed: int = 0, ckpt: str | None = None, epoch: int | None = None,
                   class_names: list[str] | None = None, dataset: str | None = None, domain: str | None = None,
                   quick_gelu: bool | None = None, dino_weights: str | None = None,
                   memory_features: bool = False) -> BuiltDetector:
    model_kind = get_kind(kind)
    if model_kind.needs_checkpoint and not ckpt:
        raise ClipadError(f"--ckpt is required for --model {kind}")
    if not clip_weights and not random_init:
        raise ClipadError("--clip-weights is required (a local CLIP weight file, e.g. ViT-L-14-336px.pt); "
                          "or pass --random-init to try the pipeline with seeded random weights")
    spec = archs.arch_spec(arch)
    spec.grid(image_size)
    classes = _resolve_classes(model_kind, class_names, dataset, domain)
    module = model_module(model_kind)

    # Read the (small) checkpoint before the (large) base weights, so its errors come fast.
    checkpoint = module.read_checkpoint(ckpt, epoch, spec) if model_kind.needs_checkpoint else None
    act_quick = module.QUICK_GELU if module.QUICK_GELU is not None else (True if quick_gelu is None else quick_gelu)
    clip = archs.build_clip(arch, quick_gelu=act_quick)
    if random_init:
        sd, fmt, source = weights.random_state_dict(clip, seed), "random-init", f"random-init(seed={seed})"
    else:
        sd, fmt = weights.read_state_dict(clip_weights)
        source = f"--clip-weights {clip_weights}"
    weights.load_into(clip, sd, arch, source)
    del sd

    sources = {"random_init": bool(random_init), "seed": seed, "dino_weights": dino_weights}
    vision, head, anchors, details = module.build(clip, spec, checkpoint, classes, image_size, _tokenizer(spec),
                                                  sources)
    info = {"weights_format": fmt, "seed": seed if random_init else None,
            "activation": "quick_gelu" if act_quick else "gelu", **details}
    core = AnomalyDetector(kind, vision, head)
    exportable = ExportableDetector(core, image_size, memory_features).eval().requires_grad_(False)
    return BuiltDetector(module=exportable, kind=kind, arch=arch, image_size=image_size,
                         class_names=classes.class_names, prompt_names=classes.prompt_names, domain=classes.domain,
                         anchors=anchors.detach().clone(), random_init=bool(random_init), info=info,
                         decision_score=model_kind.decision_score.format(domain=classes.domain))
