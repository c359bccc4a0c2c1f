"""The torch reference as a ``Backend``: any image → the official preprocessing → raw map and raw image score.

This is the executable ground truth every other backend (ONNX Runtime, OpenVINO, TensorRT) is compared against, through
the same interface and comparator (``clipad.runtime.compare.compare_runners``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clipad.runtime import precisions
from clipad.runtime.backends.base import Backend
from clipad.runtime.errors import ClipadError
from clipad.runtime.preprocess import ImageLike, prepare

from .models.factory import BuiltDetector


@dataclass
class ReferenceOutput:
    anomaly_map: np.ndarray   # [K, S, S] float32, raw (before any dataset-level normalisation)
    image_score: np.ndarray   # [K] float32, raw as the official test path defines it
    map_max: np.ndarray       # [K] float32


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, built: BuiltDetector, precision: str | None = None, threads: int | None = None,
                 device: str = "cpu"):
        chosen = precisions.get(precision)
        why = chosen.why_not(self.name)
        if why:
            raise ClipadError(f"--precision {chosen.name}: {why}")
        # bf16: torch's autocast (matrix products in BF16; LayerNorm, softmax and reductions FP32, torch's own
        # keep-list), on a CPU or GPU; any other low precision: the whole module cast, on a CUDA GPU only
        self.autocast = chosen.conversion == "bfloat16"
        if not chosen.reference and not self.autocast and device == "cpu":
            raise ClipadError(f"torch {chosen.name} needs a CUDA GPU")
        if threads:
            torch.set_num_threads(threads)
        self.built, self.device, self.precision = built, device, chosen.name
        self.image_size = built.image_size
        if device != "cpu":
            built.module.to(device)
        if not chosen.reference and not self.autocast:
            built.module.half()

    @classmethod
    def open(cls, model_dir, manifest, precision: str | None = None, threads: int | None = None,
             device: int | None = None, clip_weights: str | None = None, ckpt: str | None = None,
             dino_weights: str | None = None) -> "TorchBackend":
        """The reference rebuilt from the files the export's manifest records (``edge-bench``'s torch rows)."""
        where = "cpu" if not torch.cuda.is_available() else f"cuda:{device or 0}"
        built = rebuild_from_manifest(model_dir, clip_weights, ckpt, dino_weights)
        return cls(built, precision, threads, where)

    @property
    def description(self) -> str:
        return f"torch {torch.__version__} {self.precision}{' (autocast)' if self.autocast else ''} ({self.device})"

    @property
    def batch_range(self) -> tuple[int, int]:
        return 1, 1 << 16

    @torch.no_grad()
    def _infer(self, batch_u8: np.ndarray) -> tuple[np.ndarray, ...]:
        with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.autocast):
            outputs = self.built.module(torch.from_numpy(batch_u8).to(self.device))
        return tuple(o.float().cpu().numpy() for o in outputs)

    def predict(self, images: list[ImageLike] | ImageLike, color_order: str = "rgb") -> list[ReferenceOutput]:
        if not isinstance(images, list):
            images = [images]
        batch = np.stack([prepare(im, self.built.image_size, color_order) for im in images])
        maps, scores = self.run(batch)[:2]
        return [ReferenceOutput(m, s, m.reshape(m.shape[0], -1).max(axis=1)) for m, s in zip(maps, scores)]

    def _release(self) -> None:
        self.built = None


def rebuild_from_manifest(model_dir: str, clip_weights: str | None = None, ckpt: str | None = None,
                          dino_weights: str | None = None) -> BuiltDetector:
    """The torch model of an export, rebuilt from the source files its manifest records (checked by sha256), or
    from ``clip_weights`` / ``ckpt`` / ``dino_weights`` when the files moved. One-line errors say what is missing."""
    import os

    from clipad.runtime.manifest import Manifest, sha256_file

    from .models.factory import build_detector

    manifest = Manifest.read(model_dir)
    m, sources = manifest.model, manifest.sources or {}

    def located(given: str | None, recorded: dict | None, what: str) -> str | None:
        if given:
            return given
        if not recorded:
            return None
        path = recorded.get("path")
        if not path or not os.path.exists(path):
            raise ClipadError(f"{what} {path} recorded in the manifest is not here; pass --{what.replace('_', '-')}")
        expected = recorded.get("sha256")
        if expected and sha256_file(path) != expected:
            raise ClipadError(f"{path}: sha256 differs from the one the export recorded; pass the original with "
                              f"--{what.replace('_', '-')}")
        for name, digest in (recorded.get("files") or {}).items():
            if not os.path.isfile(os.path.join(path, name)) or sha256_file(os.path.join(path, name)) != digest:
                raise ClipadError(f"{os.path.join(path, name)}: missing or changed since the export; pass --ckpt")
        return path

    base = sources.get("clip_weights") or {}
    random_init = bool(base.get("random_init"))
    weights = None if random_init else located(clip_weights, base, "clip_weights")
    if not random_init and weights is None:
        raise ClipadError("the manifest records no base weights; pass --clip-weights")
    built = build_detector(
        m.kind, arch=m.arch, image_size=m.image_size, clip_weights=weights, random_init=random_init,
        seed=int(base.get("seed") or 0), ckpt=located(ckpt, sources.get("checkpoint"), "ckpt"),
        epoch=m.details.get("checkpoint_epoch"), class_names=m.class_names,
        domain=m.domain, quick_gelu=None if m.details.get("activation") is None
        else m.details.get("activation") == "quick_gelu",
        dino_weights=None if random_init or "dino_weights" not in sources
        else located(dino_weights, sources.get("dino_weights"), "dino_weights"))
    return built
