"""``Detector.open(DIR).predict(image)``: manifest + preprocessing + backend + decision, the API the CLI uses."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from .backends.base import Backend
from .backends.select import open_backend
from .batching import run_batched
from .decision import (
    check_threshold,
    decide,
    decision_score,
    nonfinite_error,
    normalized_score,
    p_value,
    rule_for,
)
from .errors import ClipadError
from .manifest import Calibration, ClassCalibration, Manifest
from .preprocess import ImageLike, prepare

log = logging.getLogger("clipad")


@dataclass
class Prediction:
    class_name: str
    anomaly_map: np.ndarray        # [S, S] float32 raw map of the selected class
    score: float                   # raw image score as the official test path defines it
    map_max: float
    label: str | None = None       # "OK" / "NG" with a threshold; "NG" whenever the outputs are not finite
    error: str | None = None       # set when the outputs are not finite (then label is "NG")
    decision_score: float | None = None    # what OK/NG is decided on (None: needs calibration constants)
    normalized_score: float | None = None  # 0.5 = calibrated threshold, clipped to [0, 1]
    p_value: float | None = None           # conformal p-value against the calibration's normal images
    pixel_threshold: float | None = None   # map values >= this are defect regions (calibrated)
    latency_ms: dict = field(default_factory=dict)


class Detector:
    def __init__(self, model_dir: str, manifest: Manifest, backend: Backend):
        self.model_dir, self.manifest, self.backend = model_dir, manifest, backend
        self.kind = manifest.model.kind
        self.class_names: list[str] = list(manifest.class_names)
        self.image_size: int = manifest.image_size
        self.rule = rule_for(self.kind, manifest.model.domain, manifest.model.decision_score)
        self.calibration: Calibration | None
        self.calibration, warning = manifest.calibration(backend.precision, backend.name)
        if warning:
            log.warning("WARNING: %s", warning)

    @classmethod
    def open(cls, model_dir: str | None, backend: str = "auto", precision: str | None = None,
             **options) -> "Detector":
        """``precision``: which model file (ONNX Runtime) or engine (TensorRT) runs; default FP32 for ONNX Runtime,
        the best engine for this GPU for TensorRT. ``backend="triton"`` with ``triton_url``, ``triton_model`` (and
        ``grpc``): the model runs on that server, described by the manifest it serves (``model_dir`` may be None)."""
        if backend == "triton":
            from .backends.triton import TritonBackend

            if not options.get("triton_url") or not options.get("triton_model"):
                raise ClipadError("backend='triton' needs triton_url and triton_model")
            served = TritonBackend(options["triton_url"], options["triton_model"], grpc=options.get("grpc", False))
            return cls(model_dir or served.url, served.manifest, served)
        manifest = Manifest.read(model_dir)
        return cls(model_dir, manifest, open_backend(backend, model_dir, manifest, precision=precision, **options))

    def class_calibration(self, class_name: str) -> ClassCalibration | None:
        return self.calibration.classes.get(class_name) if self.calibration else None

    def class_index(self, class_name: str | None) -> int:
        if class_name is None:
            return 0
        if class_name not in self.class_names:
            raise ClipadError(f"unknown class name {class_name!r}; this model has: {', '.join(self.class_names)}")
        return self.class_names.index(class_name)

    def describe_decision(self, class_name: str, override: float | None = None) -> str:
        """One line on how OK/NG is decided for this class, for logs."""
        if override is not None:
            return f"NG when the raw score >= {check_threshold(override)} (--threshold)"
        cal = self.class_calibration(class_name)
        if cal is None:
            return "no OK/NG (no --threshold and no calibration; run edge-calibrate)"
        c = self.calibration
        return (f"NG when the {self.rule} decision score >= {cal.image_threshold:.6g} ({c.method}, target false-alarm "
                f"rate {c.target_fpr:g}, calibrated on {c.images} normal images, {c.precision} on {c.backend})")

    def predict(self, image: ImageLike, class_name: str | None = None, color_order: str = "rgb",
                threshold: float | None = None) -> Prediction:
        return self.predict_batch([image], class_name, color_order, threshold)[0]

    def predict_batch(self, images: list[ImageLike], class_name: str | None = None, color_order: str = "rgb",
                      threshold: float | None = None) -> list[Prediction]:
        if isinstance(images, (str, bytes, np.ndarray)) or not hasattr(images, "__len__"):
            raise ClipadError("predict_batch takes a list of images (use predict for one)")
        if len(images) == 0:
            raise ClipadError("predict_batch: no images")
        k = self.class_index(class_name)
        name = self.class_names[k]
        override = check_threshold(threshold)
        t0 = time.perf_counter()
        batch = np.stack([prepare(im, self.image_size, color_order) for im in images])
        t1 = time.perf_counter()
        maps, scores = self.run(batch)
        t2 = time.perf_counter()
        out = [self.to_prediction(name, m, float(s), override) for m, s in zip(maps[:, k], scores[:, k])]
        t3 = time.perf_counter()
        per = len(images)
        for p in out:
            p.latency_ms = {"pre": 1e3 * (t1 - t0) / per, "infer": 1e3 * (t2 - t1) / per,
                            "post": 1e3 * (t3 - t2) / per}
        return out

    def to_prediction(self, name: str, amap: np.ndarray, score: float, override: float | None = None) -> Prediction:
        """One class's outputs → Prediction with the decision (calibrated, or ``override`` on the raw score)."""
        cal = self.class_calibration(name)
        map_max = float(amap.max())
        value = decision_score(self.rule, cal.decision if cal else None, map_max, score)
        if nonfinite_error(score, amap) is not None:   # the raw score too, whatever the decision score uses
            label, error = "NG", nonfinite_error(score, amap)
        elif override is not None:
            label, error = decide(score, override, amap)
        else:
            label, error = decide(value if value is not None else score, cal.image_threshold if cal else None, amap)
        pred = Prediction(name, amap, score, map_max, label, error, value)
        if cal is not None and error is None and value is not None and math.isfinite(value):
            pred.p_value = p_value(cal.normal_scores, value)
            pred.normalized_score = normalized_score(value, cal.image_threshold, cal.normal_scores)
            pred.pixel_threshold = cal.pixel_threshold
        return pred

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
