"""``Detector.open(DIR).predict(image)``: manifest + preprocessing + backend + scores, the API the CLI uses."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import manifest as manifest_io
from .backends import open_backend
from .errors import ClipadError
from .preprocess import ImageLike, pad_batch, prepare


@dataclass
class Prediction:
    class_name: str
    anomaly_map: np.ndarray        # [S, S] float32 raw map of the selected class
    score: float                   # raw image score as the official test path defines it
    map_max: float
    label: str | None = None       # "OK" / "NG" when a threshold is known
    latency_ms: dict = field(default_factory=dict)


class Detector:
    def __init__(self, model_dir: str, manifest: dict, backend):
        self.model_dir, self.manifest, self.backend = model_dir, manifest, backend
        model = manifest["model"]
        self.kind = model["kind"]
        self.class_names: list[str] = list(model["class_names"])
        self.image_size: int = int(manifest["input"]["shape"][1])
        self.thresholds: dict = dict(manifest.get("thresholds") or {})

    @classmethod
    def open(cls, model_dir: str, backend: str = "auto", **options) -> "Detector":
        data = manifest_io.read(model_dir)
        return cls(model_dir, data, open_backend(backend, model_dir, data, **options))

    def class_index(self, class_name: str | None) -> int:
        if class_name is None:
            return 0
        if class_name not in self.class_names:
            raise ClipadError(f"unknown class name {class_name!r}; this model has: {', '.join(self.class_names)}")
        return self.class_names.index(class_name)

    def threshold(self, class_name: str, override: float | None = None) -> float | None:
        if override is not None:
            return override
        value = self.thresholds.get(class_name)
        return value.get("image") if isinstance(value, dict) else value

    def predict(self, image: ImageLike, class_name: str | None = None, color_order: str = "rgb",
                threshold: float | None = None) -> Prediction:
        return self.predict_batch([image], class_name, color_order, threshold)[0]

    def predict_batch(self, images: list[ImageLike], class_name: str | None = None, color_order: str = "rgb",
                      threshold: float | None = None) -> list[Prediction]:
        k = self.class_index(class_name)
        name = self.class_names[k]
        t0 = time.perf_counter()
        batch = np.stack([prepare(im, self.image_size, color_order) for im in images])
        t1 = time.perf_counter()
        maps, scores = self.run(batch)
        t2 = time.perf_counter()
        limit = self.threshold(name, threshold)
        out = []
        for m, s in zip(maps[:, k], scores[:, k]):
            score = float(s)
            label = None if limit is None else ("NG" if score >= limit else "OK")
            out.append(Prediction(name, m, score, float(m.max()), label))
        t3 = time.perf_counter()
        per = len(images)
        for p in out:
            p.latency_ms = {"pre": 1e3 * (t1 - t0) / per, "infer": 1e3 * (t2 - t1) / per,
                            "post": 1e3 * (t3 - t2) / per}
        return out

    def run(self, batch_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run a preprocessed uint8 batch, split or padded to the model's batch range."""
        lo, hi = self.backend.batch_range
        self.backend.check_batch(batch_u8[:1], self.image_size)
        maps, scores = [], []
        for start in range(0, len(batch_u8), hi):
            chunk = batch_u8[start:start + hi]
            n = len(chunk)
            m, s = self.backend.run(pad_batch(chunk, lo))
            maps.append(m[:n])
            scores.append(s[:n])
        return np.concatenate(maps), np.concatenate(scores)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
