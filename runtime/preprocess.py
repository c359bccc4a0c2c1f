"""Image → model input, identical to the official AA-CLIP / Crane test transform.

Official transform: PIL image → RGB → Resize((S, S), bicubic; PIL antialiases when downscaling) → ToTensor →
Normalize(OpenAI mean/std). The resize happens here on the host in uint8 (exactly as PIL does it); the float
conversion and normalisation ((x/255 − mean)/std) live inside the model graph, so the host only ships uint8 NHWC.
"""
from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ClipadError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Refuse decompression bombs with a clear message instead of PIL's warning/exception text.
MAX_IMAGE_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

ImageLike = Union[str, os.PathLike, bytes, np.ndarray, Image.Image]


def load_image(source: ImageLike, color_order: str = "rgb", max_side: int | None = None) -> Image.Image:
    """Open a file path, encoded image bytes (JPEG, PNG, …), PIL image or array as an 8-bit RGB PIL image.

    Arrays may be HxW (grey), HxWx1, HxWx3 or HxWx4, uint8 or uint16; ``color_order`` says whether a 3/4-channel
    array is RGB(A) or BGR(A) (OpenCV frames are BGR). 16-bit data keeps its top 8 bits. ``max_side``: a file whose
    longest side is larger is reduced by an integer factor while decoding (JPEG: DCT scaling, which never holds the
    full image) or right after it (other formats), to bound memory; smaller files are untouched.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        return to_rgb(_array_to_pil(source, color_order))
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ClipadError("image bytes: empty (0 bytes)")
        return _decode(io.BytesIO(bytes(source)), "image bytes", max_side)
    if not isinstance(source, (str, os.PathLike)):
        raise ClipadError(f"an image must be a file path, encoded bytes, a PIL image or a numpy array, not "
                          f"{type(source).__name__}")
    path = os.fspath(source)
    if os.path.isdir(path):
        raise ClipadError(f"{path}: is a folder, not an image file")
    if not os.path.isfile(path):
        raise ClipadError(f"{path}: no such image file")
    if os.path.getsize(path) == 0:
        raise ClipadError(f"{path}: empty file (0 bytes)")
    return _decode(path, path, max_side)


def _decode(fp, name: str, max_side: int | None) -> Image.Image:
    """The one decoder for files and encoded bytes (PIL), with the decompression-bomb and large-image rules."""
    try:
        with Image.open(fp) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(name)
            factor = reduction(im.size, max_side)
            if factor > 1 and im.format == "JPEG":
                im.draft(im.mode if im.mode in ("RGB", "L") else "RGB", (im.width // factor, im.height // factor))
            im.load()
            factor = reduction(im.size, max_side)
            return to_rgb(im.reduce(factor) if factor > 1 else im)
    except Image.DecompressionBombError:
        raise ClipadError(f"{name}: image too large (more than {MAX_IMAGE_PIXELS:,} pixels)") from None
    except UnidentifiedImageError:
        raise ClipadError(f"{name}: not an image file (or an unsupported format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ClipadError(f"{name}: unreadable or truncated image ({exc})") from None


def reduction(size: tuple[int, int], max_side: int | None) -> int:
    """The integer factor that brings the longest side to ``max_side`` or below (1: no reduction)."""
    if not max_side or max(size) <= max_side:
        return 1
    return -(-max(size) // max_side)


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB like the official ``.convert('RGB')``; 16-bit/float greyscale is rescaled first, not clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im)
        return Image.fromarray(_to_uint8(arr), mode="L").convert("RGB")
    if im.mode == "RGB":
        return im
    return im.convert("RGB")


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16 or (arr.dtype.kind in "iu" and arr.max(initial=0) > 255):
        return (arr.astype(np.uint32) >> 8).astype(np.uint8) if arr.max(initial=0) > 255 else arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        return np.clip(np.rint(arr * 255.0 if arr.max(initial=0) <= 1.0 else arr), 0, 255).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _array_to_pil(arr: np.ndarray, color_order: str) -> Image.Image:
    if arr.dtype == bool or arr.dtype.kind not in "uif":
        raise ClipadError(f"image array has dtype {arr.dtype}; expected uint8 (or uint16 / float in [0, 1])")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ClipadError("image array contains NaN or infinite values")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or 0 in arr.shape:
        raise ClipadError(f"image array has shape {arr.shape}; expected HxW, HxWx1, HxWx3 or HxWx4")
    arr = _to_uint8(np.ascontiguousarray(arr))
    if arr.ndim == 2:
        return Image.fromarray(arr, mode="L")
    if color_order.lower() == "bgr":
        arr = arr[:, :, [2, 1, 0, 3][: arr.shape[2]]]
    elif color_order.lower() != "rgb":
        raise ClipadError(f"color_order must be 'rgb' or 'bgr', got {color_order!r}")
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB" if arr.shape[2] == 3 else "RGBA").convert("RGB")


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


def pad_batch(chunk: np.ndarray, size: int) -> np.ndarray:
    """Pad a batch to ``size`` rows by repeating its last image (fixed-batch models; extra outputs are dropped)."""
    if len(chunk) >= size:
        return chunk
    return np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])
