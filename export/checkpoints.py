"""Readers for the official training outputs (AA-CLIP save directory, Crane ``epoch_N.pth``), weights-only."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from clipad.runtime.errors import ClipadError

from .weights import torch_load


@dataclass
class AACLIPCheckpoint:
    text_adapters: list[torch.Tensor]   # residual adapters of text blocks 1..n, each [W, W]
    text_projection: torch.Tensor       # replaces CLIP's text_projection: LeakyReLU(y·Uᵀ), [E, W]
    layer_adapters: list[torch.Tensor]  # residual adapters of vision blocks 1..m, each [C, C]
    seg_proj: list[torch.Tensor]        # 4 × [E, C]
    det_proj: torch.Tensor              # [E, C]
    relu: bool                          # trained with --relu (LeakyReLU after seg/det projections)
    epoch: int
    files: tuple[str, str]


def _state(obj, key: str, path: str) -> dict:
    if not isinstance(obj, dict) or key not in obj or not isinstance(obj[key], dict):
        found = sorted(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise ClipadError(f"{path}: not an AA-CLIP checkpoint (no {key!r} entry; found {found})")
    return obj[key]


def _need(sd: dict, key: str, path: str) -> torch.Tensor:
    if key not in sd or not isinstance(sd[key], torch.Tensor):
        raise ClipadError(f"{path}: missing tensor {key!r}")
    return sd[key].detach().to(torch.float32)


def _count(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def load_aaclip(ckpt_dir: str, epoch: int | None = None) -> AACLIPCheckpoint:
    """Official AA-CLIP save directory: ``text_adapter.pth`` + ``image_adapter_<epoch>.pth`` (latest epoch default)."""
    if not os.path.isdir(ckpt_dir):
        raise ClipadError(f"--ckpt {ckpt_dir}: not a directory (AA-CLIP expects the training save folder)")
    text_path = os.path.join(ckpt_dir, "text_adapter.pth")
    epochs = sorted(int(m.group(1)) for f in os.listdir(ckpt_dir) if (m := re.fullmatch(r"image_adapter_(\d+)\.pth", f)))
    if epoch is None:
        if not epochs:
            raise ClipadError(f"--ckpt {ckpt_dir}: no image_adapter_<epoch>.pth file")
        epoch = epochs[-1]
    elif epoch not in epochs:
        raise ClipadError(f"--ckpt {ckpt_dir}: no image_adapter_{epoch}.pth (found epochs {epochs or 'none'})")
    image_path = os.path.join(ckpt_dir, f"image_adapter_{epoch}.pth")

    text_sd = _state(torch_load(text_path, "--ckpt"), "text_adapter", text_path)
    image_sd = _state(torch_load(image_path, "--ckpt"), "image_adapter", image_path)

    n_text = _count(text_sd, r"(\d+)\.fc\.0\.weight$")
    if n_text < 2:
        raise ClipadError(f"{text_path}: expected text adapters '0.fc.0.weight' … and a projection, found {n_text}")
    text_all = [_need(text_sd, f"{i}.fc.0.weight", text_path) for i in range(n_text)]
    n_layer = _count(image_sd, r"layer_adapters\.(\d+)\.fc\.0\.weight$")
    relu = any(k.startswith("seg_proj.0.fc.0.") for k in image_sd)
    proj_key = "fc.0.weight" if relu else "fc.weight"
    return AACLIPCheckpoint(
        text_adapters=text_all[:-1], text_projection=text_all[-1],
        layer_adapters=[_need(image_sd, f"layer_adapters.{i}.fc.0.weight", image_path) for i in range(n_layer)],
        seg_proj=[_need(image_sd, f"seg_proj.{j}.{proj_key}", image_path) for j in range(4)],
        det_proj=_need(image_sd, f"det_proj.{proj_key}", image_path),
        relu=relu, epoch=epoch, files=(text_path, image_path),
    )


CRANE_KEYS = ("ctx_pos", "ctx_neg", "token_prefix_pos", "token_prefix_neg", "token_suffix_pos", "token_suffix_neg",
              "tokenized_prompts_pos", "tokenized_prompts_neg")


@dataclass
class CraneCheckpoint:
    prompts: dict[str, torch.Tensor]     # the CRANE_KEYS tensors as stored
    compound: list[torch.Tensor]         # deep text prompts for text blocks 2.., each [t_n_ctx, W]
    path: str


def load_crane(path: str) -> CraneCheckpoint:
    """Official Crane ``epoch_N.pth``: ``{"prompt_learner": state_dict}`` (CUDA tensors; mapped to CPU)."""
    obj = torch_load(path, "--ckpt")
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt_learner"), dict):
        raise ClipadError(f"--ckpt {path}: not a Crane checkpoint (no 'prompt_learner' entry)")
    sd = obj["prompt_learner"]
    prompts = {}
    for key in CRANE_KEYS:
        if not isinstance(sd.get(key), torch.Tensor):
            raise ClipadError(f"--ckpt {path}: Crane prompt learner lacks {key!r}")
        prompts[key] = sd[key].detach().cpu()
    n = _count(sd, r"compound_prompts_text\.(\d+)$")
    compound = [sd[f"compound_prompts_text.{i}"].detach().cpu().to(torch.float32) for i in range(n)]
    return CraneCheckpoint(prompts=prompts, compound=compound, path=path)
