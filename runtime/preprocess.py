"""Image → model input, identical to the official AA-CLIP / Crane test transform.

Official transform: PIL image → RGB → Resize((S, S), bicubic; PIL antialiases when downscaling) → ToTensor →
Normalize(OpenAI mean/std). The resize happens here on the host in uint8 (exactly as PIL does it); the float
conversion and normalisation ((x/255 − mean)/std) live inside the model graph, so the host only ships uint8 NHWC.
Decoding (and the size policy for large files) is ``inputs.load_image``.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .inputs import ImageLike, load_image, to_rgb

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

__all__ = ["ImageLike", "OPENAI_MEAN", "OPENAI_STD", "normalize", "prepare", "resize_for_model"]


def resize_for_model(im: Image.Image, size: int) -> np.ndarray:
    """Square, aspect-squashing PIL bicubic resize (antialiased when shrinking) → uint8 [S, S, 3] RGB."""
    resized = to_rgb(im).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def prepare(source: ImageLike, size: int, color_order: str = "rgb") -> np.ndarray:
    """Any supported image → the model's uint8 NHWC input row [S, S, 3]."""
    return resize_for_model(load_image(source, color_order), size)


def normalize(batch_u8: np.ndarray) -> np.ndarray:
    """NumPy twin of the in-graph normalisation (uint8 NHWC → float32 NCHW); used by tests and debugging."""
    x = batch_u8.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(OPENAI_MEAN, np.float32)) / np.asarray(OPENAI_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
