"""Test sets in MVTec AD layout: ``ROOT/<class>/test/<defect>/<stem>.<ext>`` with ground-truth masks
``ROOT/<class>/ground_truth/<defect>/<stem>_mask.png``; ``good`` images have no mask and ``train/`` is ignored. Masks
are 0/255 (defect where > 127) or 0/1 (a mask whose maximum is 1: defect where 1, counted in the report); a defect
image's mask with values but none above 127 is a warning and leaves the image out of the pixel metrics. Problems that
leave a meaningful evaluation are warnings; the rest are one-line errors."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from clipad.runtime.errors import ClipadError
from clipad.runtime.inputs import list_images

GOOD = "good"
MASK_01, MASK_255 = "0/1", "0/255"


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
    try:
        return list_images(folder, "--data", single_file=False).paths
    except ClipadError:   # a defect folder without images: the class reports it as empty
        return []


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


def load_mask(path: str, size: int, image_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, str]:
    """(bool [size, size], MASK_01 or MASK_255): the mask binarised (0/1 masks: defect where 1; else defect where
    > 127), then resized to size×size with PIL's nearest neighbour (as torchvision's Resize on a PIL mask).
    ``image_shape`` (height, width): a mask of another size is an error (it belongs to another image); a mask with
    values but none above 127 and not 0/1 is an error too (what it marks is unknown)."""
    from PIL import Image

    from clipad.runtime.inputs import load_image

    mask = np.asarray(load_image(path, max_side=None).convert("L"))
    if image_shape is not None and mask.shape != tuple(image_shape):
        raise ClipadError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image "
                          f"{image_shape[1]}x{image_shape[0]}")
    top = int(mask.max(initial=0))
    if top == 1:
        kind, binary = MASK_01, mask >= 1
    elif 1 < top <= 127:
        raise ClipadError(f"{path}: mask values go up to {top}, none above 127 and not a 0/1 mask")
    else:
        kind, binary = MASK_255, mask > 127
    image = Image.fromarray(np.where(binary, 255, 0).astype(np.uint8))
    return np.asarray(image.resize((size, size), Image.Resampling.NEAREST)) > 0, kind
