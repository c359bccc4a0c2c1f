"""Test sets in MVTec AD layout: ``ROOT/<class>/test/<defect>/<stem>.<ext>`` with ground-truth masks
``ROOT/<class>/ground_truth/<defect>/<stem>_mask.png`` (defect where > 127); ``good`` images have no mask and
``train/`` is ignored. Problems that leave a meaningful evaluation are warnings; the rest are one-line errors."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from clipad.runtime.errors import ClipadError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
GOOD = "good"


@dataclass
class Sample:
    cls: str
    defect: str                  # "good" or the defect type folder
    path: str
    mask_path: str | None        # None for good images, or when the mask is missing (see warnings)

    @property
    def is_defect(self) -> bool:
        return self.defect != GOOD

    @property
    def stem(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]


@dataclass
class TestSet:
    classes: dict[str, list[Sample]]
    warnings: list[str] = field(default_factory=list)


def _images(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))


def scan(root: str, classes: list[str] | None = None) -> TestSet:
    if not os.path.isdir(root):
        raise ClipadError(f"--data {root}: not a directory")
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, "test")))
    if not found:
        raise ClipadError(f"--data {root}: no <class>/test folders (MVTec AD layout: ROOT/<class>/test/<defect>/…)")
    if classes:
        missing = [c for c in classes if c not in found]
        if missing:
            raise ClipadError(f"--classes {' '.join(missing)}: not in {root} (has: {', '.join(found)})")
        found = list(classes)
    out = TestSet({})
    for cls in found:
        test = os.path.join(root, cls, "test")
        samples = []
        for defect in sorted(d for d in os.listdir(test) if os.path.isdir(os.path.join(test, d))):
            for path in _images(os.path.join(test, defect)):
                mask = None
                if defect != GOOD:
                    stem = os.path.splitext(os.path.basename(path))[0]
                    mask = os.path.join(root, cls, "ground_truth", defect, f"{stem}_mask.png")
                    if not os.path.isfile(mask):
                        out.warnings.append(f"{cls}: no mask {mask}; {os.path.basename(path)} is left out of the "
                                            f"pixel metrics")
                        mask = None
                samples.append(Sample(cls, defect, path, mask))
        if not samples:
            out.warnings.append(f"{cls}: no test images; class skipped")
            continue
        out.classes[cls] = samples
    if not out.classes:
        raise ClipadError(f"--data {root}: no test images in {', '.join(found)}")
    return out


def load_mask(path: str, size: int, image_shape: tuple[int, int] | None = None) -> np.ndarray:
    """The mask thresholded at > 127, then resized to size×size with PIL's nearest neighbour (as torchvision's
    Resize on a PIL mask) → bool [size, size]. ``image_shape`` (height, width): a mask of another size is an error (it
    belongs to another image)."""
    from PIL import Image

    from clipad.runtime.preprocess import load_image

    mask = np.asarray(load_image(path).convert("L"))
    if image_shape is not None and mask.shape != tuple(image_shape):
        raise ClipadError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image "
                          f"{image_shape[1]}x{image_shape[0]}")
    binary = Image.fromarray(np.where(mask > 127, 255, 0).astype(np.uint8))
    return np.asarray(binary.resize((size, size), Image.Resampling.NEAREST)) > 0
