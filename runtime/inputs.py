"""The one way every tool lists and reads images: edge-detect, edge-calibrate, edge-eval, edge-bench, the export's
gates and INT8 calibration, and Triton's pre model all go through here, so an image is seen the same everywhere.

Listing (``list_images``): a folder gives its visible files with an image extension (``IMAGE_EXTENSIONS``), sorted;
other files are skipped and counted; a glob the same; a single file is taken as given. Reading (``load_image``):
8-bit RGB like the official ``.convert('RGB')``; files above ``MAX_IMAGE_PIXELS`` are refused; files and encoded
bytes whose longest side exceeds ``LARGE_SIDE`` are reduced by an integer factor while decoding (JPEG: DCT scaling,
so the full image is never held) to bound memory, and the reduced image remembers the original size. EXIF
orientation is ignored, as the official transforms ignore it.
"""
from __future__ import annotations

import glob
import io
import os
from dataclasses import dataclass, field
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ClipadError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".dib", ".tif", ".tiff", ".webp", ".pgm", ".ppm",
                    ".pnm", ".pbm", ".gif")
MAX_IMAGE_PIXELS = 100_000_000     # decompression bombs: refused with a clear message
LARGE_SIDE = 4096                  # longer sides are reduced while decoding (memory bound)
GLOB_CHARS = frozenset("*?[")
ORIGINAL_SIZE = "clipad_original_size"   # PIL info key: (width, height) of a file reduced on decoding
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

ImageLike = Union[str, os.PathLike, bytes, np.ndarray, Image.Image]


@dataclass
class ImageListing:
    paths: list[str]
    skipped: list[str] = field(default_factory=list)    # files left out: not an image extension

    def skipped_note(self) -> str | None:
        if not self.skipped:
            return None
        shown = ", ".join(os.path.basename(p) for p in self.skipped[:3])
        more = f" and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
        return f"skipped {len(self.skipped)} file(s) without an image extension ({shown}{more})"


def is_image_name(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _folder_files(path: str, flag: str) -> list[str]:
    """Visible entries that are not folders; entries that cannot be inspected (broken links, loops, permissions)
    are kept, so they become per-file errors instead of stopping the run."""
    try:
        with os.scandir(path) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise ClipadError(f"{flag} {path}: folder cannot be read ({exc.strerror or exc})") from None
    files = []
    for entry in entries:
        try:
            if entry.is_dir():
                continue
        except OSError:
            pass
        files.append(os.path.join(path, entry.name))
    return files


def list_images(spec: str, flag: str = "--source", single_file: bool = True) -> ImageListing:
    """The images of a folder, a glob or (``single_file``) one file; a one-line error when there are none."""
    if spec is None or not str(spec).strip():
        raise ClipadError(f"{flag}: empty; give a folder, a glob or an image file")
    path = os.path.expanduser(os.fspath(spec))
    if os.path.isdir(path):
        files = _folder_files(path, flag)
    elif os.path.isfile(path):
        if not single_file:
            raise ClipadError(f"{flag} {spec}: a file; give a folder or a glob of images")
        return ImageListing([path])
    elif GLOB_CHARS & set(path):
        files = sorted(p for p in glob.glob(path, recursive=True) if not os.path.isdir(p))
    else:
        raise ClipadError(f"{flag} {spec}: no such file, folder or glob")
    listing = ImageListing([f for f in files if is_image_name(f)], [f for f in files if not is_image_name(f)])
    if not listing.paths:
        what = "folder" if os.path.isdir(path) else "pattern"
        extra = f"; {listing.skipped_note()}" if listing.skipped else ""
        raise ClipadError(f"{flag} {spec}: this {what} has no image files ({', '.join(IMAGE_EXTENSIONS[:7])} …)"
                          + extra)
    return listing


# ---- decoding ---------------------------------------------------------------------------------------------------------
def load_image(source: ImageLike, color_order: str = "rgb", max_side: int | None = LARGE_SIDE) -> Image.Image:
    """A file path, encoded bytes (JPEG, PNG, …), PIL image or array as an 8-bit RGB PIL image.

    Arrays may be HxW (grey), HxWx1, HxWx3 or HxWx4, uint8 or uint16 (or float in [0, 1]); ``color_order`` says
    whether a 3/4-channel array is RGB(A) or BGR(A) (OpenCV frames are BGR). 16-bit data keeps its top 8 bits.
    Files and bytes larger than ``max_side`` are reduced while decoding (None: never).
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
    try:
        with Image.open(fp) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(name)
            original = im.size
            factor = reduction(im.size, max_side)
            if factor > 1 and im.format == "JPEG":
                im.draft(im.mode if im.mode in ("RGB", "L") else "RGB", (im.width // factor, im.height // factor))
            im.load()
            factor = reduction(im.size, max_side)
            out = to_rgb(im.reduce(factor) if factor > 1 else im)
    except Image.DecompressionBombError:
        raise ClipadError(f"{name}: image too large (more than {MAX_IMAGE_PIXELS:,} pixels)") from None
    except UnidentifiedImageError:
        raise ClipadError(f"{name}: not an image file (or an unsupported format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ClipadError(f"{name}: unreadable or truncated image ({exc})") from None
    if out.size != original:
        out.info[ORIGINAL_SIZE] = original
    return out


def original_size(image: Image.Image) -> tuple[int, int] | None:
    """(width, height) of the file when ``image`` was reduced on decoding, else None."""
    return image.info.get(ORIGINAL_SIZE)


def reduction(size: tuple[int, int], max_side: int | None) -> int:
    """The integer factor that brings the longest side to ``max_side`` or below (1: no reduction)."""
    if not max_side or max(size) <= max_side:
        return 1
    return -(-max(size) // max_side)


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB like the official ``.convert('RGB')``; 16-bit/float greyscale is rescaled first, not clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(im)), mode="L").convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


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


def read_bgr(path: str) -> tuple[np.ndarray | None, str | None, tuple[int, int] | None]:
    """A still image for display and the model: (BGR uint8 HxWx3, None, original size when reduced) or
    (None, one-line error, None). Never raises for a bad file."""
    try:
        image = load_image(path)
    except ClipadError as exc:
        return None, _one_line(exc), None
    except Exception as exc:  # any other decoder failure is still a per-file error, never a crash
        return None, _one_line(f"{path}: unreadable image ({type(exc).__name__}: {exc})"), None
    rgb = np.asarray(image, dtype=np.uint8)
    return np.ascontiguousarray(rgb[:, :, ::-1]), None, original_size(image)


def _one_line(text) -> str:
    return " ".join(str(text).split())
