"""``Detector.open(DIR).predict(image)``: manifest + preprocessing + backend + decision, the API the CLI uses."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .backends.base import Backend
from .backends.select import open_backend
from .batching import run_batched
from .decision import check_threshold, decide
from .errors import ClipadError
from .manifest import Manifest
from .preprocess import ImageLike, prepare


@dataclass
class Prediction:
    class_name: str
    anomaly_map: np.ndarray        # [S, S] float32 raw map of the selected class
    score: float                   # raw image score as the official test path defines it
    map_max: float
    label: str | None = None       # "OK" / "NG" with a threshold; "NG" whenever the outputs are not finite
    error: str | None = None       # set when the outputs are not finite (then label is "NG")
    latency_ms: dict = field(default_factory=dict)


class Detector:
    def __init__(self, model_dir: str, manifest: Manifest, backend: Backend):
        self.model_dir, self.manifest, self.backend = model_dir, manifest, backend
        self.kind = manifest.model.kind
        self.class_names: list[str] = list(manifest.class_names)
        self.image_size: int = manifest.image_size

    @classmethod
    def open(cls, model_dir: str, backend: str = "auto", **options) -> "Detector":
        manifest = Manifest.read(model_dir)
        return cls(model_dir, manifest, open_backend(backend, model_dir, manifest, **options))

    def class_index(self, class_name: str | None) -> int:
        if class_name is None:
            return 0
        if class_name not in self.class_names:
            raise ClipadError(f"unknown class name {class_name!r}; this model has: {', '.join(self.class_names)}")
        return self.class_names.index(class_name)

    def threshold(self, class_name: str, override: float | None = None) -> float | None:
        """``override`` (e.g. --threshold) if given, else the manifest's calibrated image threshold, else None."""
        if override is not None:
            return check_threshold(override)
        return check_threshold(self.manifest.class_thresholds(class_name).image, f"manifest threshold of {class_name}")

    def predict(self, image: ImageLike, class_name: str | None = None, color_order: str = "rgb",
                threshold: float | None = None) -> Prediction:
        return self.predict_batch([image], class_name, color_order, threshold)[0]

    def predict_batch(self, images: list[ImageLike], class_name: str | None = None, color_order: str = "rgb",
                      threshold: float | None = None) -> list[Prediction]:
        k = self.class_index(class_name)
        name = self.class_names[k]
        limit = self.threshold(name, threshold)
        t0 = time.perf_counter()
        batch = np.stack([prepare(im, self.image_size, color_order) for im in images])
        t1 = time.perf_counter()
        maps, scores = self.run(batch)
        t2 = time.perf_counter()
        out = []
        for m, s in zip(maps[:, k], scores[:, k]):
            score = float(s)
            label, error = decide(score, limit, m)
            out.append(Prediction(name, m, score, float(m.max()), label, error))
        t3 = time.perf_counter()
        per = len(images)
        for p in out:
            p.latency_ms = {"pre": 1e3 * (t1 - t0) / per, "infer": 1e3 * (t2 - t1) / per,
                            "post": 1e3 * (t3 - t2) / per}
        return out

    def run(self, batch_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run any number of preprocessed uint8 images, split and padded to the model's batch range."""
        s = self.image_size
        if batch_u8.dtype != np.uint8 or batch_u8.ndim != 4 or batch_u8.shape[1:] != (s, s, 3):
            raise ClipadError(f"input batch must be uint8 [N, {s}, {s}, 3], got {batch_u8.dtype} "
                              f"{list(batch_u8.shape)}")
        lo, hi = self.backend.batch_range
        maps, scores = run_batched(self.backend.run, batch_u8, lo, hi)
        return maps, scores

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
