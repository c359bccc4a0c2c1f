"""Local base-weight files → OpenAI-layout float32 state dicts, checked against the architecture.

Accepted: an OpenAI TorchScript archive (``ViT-L-14-336px.pt``), a plain state dict in OpenAI key layout, an open_clip
checkpoint (``{"state_dict": …}``, ``module.`` prefixes) or a ``.safetensors`` file. Nothing is ever downloaded.
Pickles are read with ``torch.load(weights_only=True)``, so a file that would execute code is refused.
"""
from __future__ import annotations

import os
import pickle
import zipfile
import zlib

import numpy as np
import torch

from clipad.runtime.errors import ClipadError

OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def torch_load(path: str, what: str):
    """torch.load with weights_only=True and one-line errors for missing, empty, corrupt or unsafe files."""
    if not os.path.isfile(path):
        raise ClipadError(f"{what} {path}: " + ("is a folder, not a file" if os.path.isdir(path) else "no such file"))
    if os.path.getsize(path) == 0:
        raise ClipadError(f"{what} {path}: empty file (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise ClipadError(f"{what} {path}: refused, it holds Python objects that safe (weights-only) loading "
                              f"does not allow: {_unsafe_detail(str(exc))}") from None
        detail = next((line.strip() for line in str(exc).splitlines() if "Unsupported operand" in line
                       or "invalid load key" in line), first)
    except Exception as exc:  # torch.load on damaged bytes raises many types (EOFError, IndexError, …)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    raise ClipadError(f"{what} {path}: not a torch checkpoint, or corrupt or truncated ({detail[:160]})") from None


def _unsafe_detail(message: str) -> str:
    for line in message.splitlines():
        if "Unsupported global" in line or "GLOBAL" in line:
            return line.strip()[:200]
    return message.strip().splitlines()[0][:200]


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.split("/", 2)[1:2] == ["code"] for name in zf.namelist() if "/" in name)


def read_state_dict(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """Read a base-weight file → (float32 state dict in OpenAI/open_clip key layout, format name)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ClipadError(f"--clip-weights {path}: " + ("is a folder, not a weight file" if os.path.isdir(path)
                                                       else "no such file"))
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd, fmt = load_file(path), "safetensors"
        except (SafetensorError, OSError, ValueError) as exc:
            raise ClipadError(f"--clip-weights {path}: corrupt safetensors file ({exc})") from None
    elif _is_torchscript(path):
        # OpenAI's archive is TorchScript; its loader runs TorchScript IR, not arbitrary Python pickles.
        try:
            sd, fmt = torch.jit.load(path, map_location="cpu").state_dict(), "openai-torchscript"
        except RuntimeError as exc:
            raise ClipadError(f"--clip-weights {path}: corrupt TorchScript archive "
                              f"({str(exc).strip().splitlines()[0][:160]})") from None
    else:
        sd, fmt = torch_load(path, "--clip-weights"), "state-dict"
    sd = _unwrap(sd, path)
    for key in OPENAI_EXTRA_KEYS:
        sd.pop(key, None)
    return {k: v.detach().to(torch.float32) for k, v in sd.items()}, fmt


def _unwrap(obj, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise ClipadError(f"--clip-weights {path}: not a CLIP state dict (found {type(obj).__name__})")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            if key in OPENAI_EXTRA_KEYS:
                continue
            raise ClipadError(f"--clip-weights {path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


def load_into(clip, sd: dict[str, torch.Tensor], arch: str, source: str) -> None:
    """Copy ``sd`` into the open_clip module; the first missing, unexpected or mis-shaped key is a one-line error."""
    expected = clip.state_dict()
    for key, tensor in expected.items():
        if key not in sd:
            raise ClipadError(f"{source}: missing key {key!r} (shape {list(tensor.shape)}) for {arch}; "
                              f"is this a CLIP checkpoint of that architecture?")
        if tuple(sd[key].shape) != tuple(tensor.shape):
            raise ClipadError(f"{source}: key {key!r} has shape {list(sd[key].shape)}, {arch} expects "
                              f"{list(tensor.shape)}; pass the matching --arch")
    for key in sd:
        if key not in expected:
            raise ClipadError(f"{source}: unexpected key {key!r} (shape {list(sd[key].shape)}) for {arch}")
    clip.load_state_dict(sd, strict=True)


# ---- seeded random base weights (--random-init) -------------------------------------------------------------
# Same per-tensor rule as ../shared/golden/make_weights.py, so ViT-L-14-336 with seed 0 gives those exact weights.

def _draw(seed_key: str, shape, mean: float, std: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([zlib.crc32(seed_key.encode("utf-8")), int(seed)]))
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std) + np.float32(mean)


def _init_rule(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    leaf = key.rsplit(".", 1)[-1]
    is_norm = any(part.startswith("ln_") for part in key.split("."))
    if is_norm:
        return (1.0, 0.05) if leaf == "weight" else (0.0, 0.02)
    if key == "visual.positional_embedding":
        return 0.0, 0.5
    if key in ("token_embedding.weight", "positional_embedding", "visual.class_embedding"):
        return 0.0, 0.02
    if key in ("visual.proj", "text_projection"):
        return 0.0, shape[0] ** -0.5
    if leaf.endswith("bias"):
        return 0.0, 0.02
    fan_in = int(np.prod(shape[1:]))
    return 0.0, fan_in ** -0.5


def random_state_dict(clip, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic pseudo-random weights for every tensor of ``clip``, stored via float16 like OpenAI's file."""
    out = {}
    for key, tensor in clip.state_dict().items():
        shape = tuple(tensor.shape)
        if key == "logit_scale":
            arr = np.full(shape, np.log(100.0), dtype=np.float16)
        else:
            arr = _draw(key, shape, *_init_rule(key, shape), seed).astype(np.float16)
        out[key] = torch.from_numpy(arr).to(torch.float32)
    return out
