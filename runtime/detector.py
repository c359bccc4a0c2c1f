"""``Detector.open(DIR).predict(image)``: manifest + preprocessing + backend + decision policy, the Python API and
what every command runs. Plumbing (the backend) and policy (``DecisionPolicy``) stay apart: ``predict_prepared`` is
the one prepare → run → decide path that ``predict``, ``predict_batch`` and the staged ``edge-detect`` run share."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from .backends.base import Backend
from .backends.registry import get as backend_spec
from .backends.registry import open_backend
from .batching import run_batched
from .errors import ClipadError
from .fewshot import FewShot
from .manifest import Manifest
from .policy import DecisionPolicy
from .preprocess import ImageLike, prepare

log = logging.getLogger("clipad")


@dataclass
class Prediction:
    class_name: str
    anomaly_map: np.ndarray | None  # [S, S] float32 raw map of the selected class (None: the image was unreadable)
    score: float                   # raw image score as the official test path defines it
    map_max: float
    label: str | None = None       # "OK" / "NG" with a threshold; "NG" whenever the outputs are not finite
    error: str | None = None       # set when the outputs (or the threshold) are not finite (then label is "NG")
    decision_score: float | None = None    # what OK/NG is decided on (None: needs calibration constants)
    normalized_score: float | None = None  # 0.5 = calibrated threshold, clipped to [0, 1]
    p_value: float | None = None           # conformal p-value against the calibration's normal images
    pixel_threshold: float | None = None   # map values >= this are defect regions (calibrated)
    calibration: dict | None = None        # which calibration decided (method, target_fpr, created, …)
    latency_ms: dict = field(default_factory=dict)
    fewshot_map: np.ndarray | None = None  # [S, S] few-shot part (1 − max cosine to the memory, in [0, 2]);
    fewshot_max: float | None = None       # then anomaly_map, map_max and score are the fused values


class Detector:
    def __init__(self, model_dir: str | None, manifest: Manifest, backend: Backend, memory: bool = True):
        """``memory`` False ignores few-shot memories (``edge-calibrate`` builds a new one)."""
        self.model_dir, self.manifest, self.backend = model_dir, manifest, backend
        self.kind = manifest.model.kind
        self.class_names: list[str] = list(manifest.class_names)
        self.image_size: int = manifest.image_size
        try:
            self.swap(*decision_setup(model_dir, manifest, backend, memory))
        except BaseException:
            backend.close()
            raise

    # The policy and the memories its thresholds were fitted with change together (a station reloads both): one
    # tuple, replaced in one assignment, read once per batch.
    def swap(self, policy: DecisionPolicy, fewshot: FewShot | None) -> None:
        self._decider = (policy, fewshot)

    @property
    def policy(self) -> DecisionPolicy:
        return self._decider[0]

    @property
    def fewshot(self) -> FewShot | None:
        return self._decider[1]

    @fewshot.setter
    def fewshot(self, value: FewShot | None) -> None:
        self._decider = (self._decider[0], value)

    @classmethod
    def open(cls, model_dir: str | None, backend: str = "auto", memory: bool = True, **options) -> "Detector":
        """``options`` go to the backend (``clipad.runtime.backends.registry``): ``precision`` (which model file or
        engine runs; default FP32 for ONNX Runtime, the best engine for this GPU for TensorRT), ``threads``,
        ``device``, ``engine``, ``cuda_graph``; ``backend="triton"`` takes ``triton_url``, ``triton_model`` and
        ``grpc`` (the model runs on that server, described by the manifest it serves; ``model_dir`` is None)."""
        if backend not in ("auto", "best") and backend_spec(backend).remote:
            runner = open_backend(backend, None, None, **options)
            return cls(model_dir, runner.manifest, runner, memory)
        manifest = Manifest.read(model_dir)
        return cls(model_dir, manifest, open_backend(backend, model_dir, manifest, **options), memory)

    @property
    def rule(self) -> str:
        return self.policy.rule

    def class_index(self, class_name: str | None) -> int:
        if class_name is None:
            return 0
        if class_name not in self.class_names:
            raise ClipadError(f"unknown class name {class_name!r}; this model has: {', '.join(self.class_names)}")
        return self.class_names.index(class_name)

    def predict(self, image: ImageLike, class_name: str | None = None, color_order: str = "rgb",
                threshold: float | None = None) -> Prediction:
        """One image; an image that cannot be read is a ClipadError."""
        name = self.class_names[self.class_index(class_name)]
        t0 = time.perf_counter()
        row = prepare(image, self.image_size, color_order)
        pre_ms = 1e3 * (time.perf_counter() - t0)
        (pred,) = self.predict_prepared(row[None], name, threshold)
        pred.latency_ms["pre"] = pre_ms
        return pred

    def predict_batch(self, images: list[ImageLike], class_name: str | None = None, color_order: str = "rgb",
                      threshold: float | None = None) -> list[Prediction]:
        """Any number of images; one that cannot be read gives a Prediction with ``error`` set, no map and no label,
        and the others are still predicted."""
        if isinstance(images, (str, bytes, np.ndarray)) or not hasattr(images, "__len__"):
            raise ClipadError("predict_batch takes a list of images (use predict for one)")
        if len(images) == 0:
            raise ClipadError("predict_batch: no images")
        name = self.class_names[self.class_index(class_name)]
        t0 = time.perf_counter()
        rows, errors = [], {}
        for i, image in enumerate(images):
            try:
                rows.append(prepare(image, self.image_size, color_order))
            except ClipadError as exc:
                errors[i] = str(exc)
        pre_ms = 1e3 * (time.perf_counter() - t0) / len(images)
        done = iter(self.predict_prepared(np.stack(rows), name, threshold) if rows else [])
        out = []
        for i in range(len(images)):
            if i in errors:
                out.append(Prediction(name, None, float("nan"), float("nan"), None, errors[i]))
            else:
                pred = next(done)
                pred.latency_ms["pre"] = pre_ms
                out.append(pred)
        return out

    def predict_prepared(self, batch_u8: np.ndarray, class_name: str | list[str], threshold: float | None = None
                         ) -> list[Prediction]:
        """Run prepared model inputs [N, S, S, 3] (any N) and decide each for ``class_name`` (one for all, or one per
        image: frames of several cameras reporting different classes share one inference)."""
        names = [class_name] * len(batch_u8) if isinstance(class_name, str) else list(class_name)
        if len(names) != len(batch_u8):
            raise ClipadError(f"predict_prepared: {len(names)} class names for {len(batch_u8)} images")
        ks = [self.class_index(n) for n in names]
        policy, memories = self._decider
        t1 = time.perf_counter()
        maps, scores, fewshot = self._run_with(memories, batch_u8, set(ks))
        infer_ms = 1e3 * (time.perf_counter() - t1) / len(batch_u8)
        out = []
        for i, (name, k) in enumerate(zip(names, ks)):
            t = time.perf_counter()
            pred = self.decide(name, maps[i, k], float(scores[i, k]), threshold, policy)
            if k in fewshot:
                pred.fewshot_map = fewshot[k][i]
                pred.fewshot_max = float(np.max(pred.fewshot_map))
            pred.latency_ms = {"pre": 0.0, "infer": infer_ms, "post": 1e3 * (time.perf_counter() - t)}
            out.append(pred)
        return out

    def decide(self, class_name: str, amap: np.ndarray, score: float, threshold: float | None = None,
               policy: DecisionPolicy | None = None) -> Prediction:
        """One class's outputs → Prediction with the decision (calibrated, or ``threshold`` on the raw score)."""
        policy = policy or self.policy
        warning = policy.take_warning()
        if warning:
            log.warning("WARNING: %s", warning)
        d = policy.decide(class_name, amap, score, threshold)
        return Prediction(class_name, amap, score, float(np.max(amap)), d.label, d.error, d.decision_score,
                          d.normalized_score, d.p_value, d.pixel_threshold, d.calibration)

    def run(self, batch_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run any number of preprocessed uint8 images, split and padded to the model's batch range: (anomaly_map,
        image_score), fused with the few-shot memory for the classes that have one."""
        maps, scores, _ = self.run_all(batch_u8)
        return maps, scores

    def run_all(self, batch_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        """(anomaly_map, image_score, {class index: fewshot_map}) of any number of images, every class with a
        memory fused."""
        return self._run_with(self.fewshot, batch_u8, None)

    def _run_with(self, memories: FewShot | None, batch_u8: np.ndarray, classes: set[int] | None):
        outputs = self.run_raw(batch_u8)
        maps, scores = outputs[0], outputs[1]
        if memories is None:
            return maps, scores, {}
        if len(outputs) < 3:
            raise ClipadError(f"the {self.backend.name} backend gives no patch_features, which the few-shot memory "
                              f"needs")
        maps, scores = np.array(maps, np.float32), np.array(scores, np.float32)
        chunk = max(1, self.backend.batch_range[1])
        return maps, scores, memories.apply(self.class_names, maps, scores, outputs[2], classes, chunk)

    def run_raw(self, batch_u8: np.ndarray) -> tuple[np.ndarray, ...]:
        """The model's own outputs (anomaly_map, image_score[, patch_features]), without any memory."""
        s = self.image_size
        if not isinstance(batch_u8, np.ndarray) or batch_u8.dtype != np.uint8 or batch_u8.ndim != 4 \
                or batch_u8.shape[1:] != (s, s, 3) or len(batch_u8) == 0:
            raise ClipadError(f"input batch must be uint8 [N, {s}, {s}, 3] with N >= 1, got "
                              f"{getattr(batch_u8, 'dtype', type(batch_u8).__name__)} "
                              f"{list(getattr(batch_u8, 'shape', []))}")
        lo, hi = self.backend.batch_range
        return run_batched(self.backend.run, batch_u8, lo, hi)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def decision_setup(model_dir: str | None, manifest: Manifest, backend: Backend, memory: bool = True
                   ) -> tuple[DecisionPolicy, FewShot | None]:
    """The policy of this precision and backend and the few-shot memories its thresholds were fitted with. Thresholds
    fitted with a memory are used only with it: without ``memory``, or when the calibration is another precision's
    (its memory holds that precision's features), those classes count as uncalibrated (said once)."""
    policy = DecisionPolicy(manifest, backend.precision, backend.name, memory=memory)
    cal = policy.calibration
    with_memory = [n for n, c in (cal.classes.items() if cal else []) if c.memory is not None]
    if memory and with_memory and cal.precision != backend.precision:
        policy = DecisionPolicy(manifest, backend.precision, backend.name, memory=False)
        log.warning("WARNING: the %s calibration of %s was fitted with a few-shot memory of %s features; %s runs "
                    "uncalibrated (run edge-calibrate --memory … --precision %s)", cal.precision,
                    ", ".join(with_memory), cal.precision, backend.precision, backend.precision)
        return policy, None
    if not memory:
        return policy, None
    return policy, FewShot.open(model_dir, manifest, cal, backend.precision, backend.name,
                                **graph_settings(backend))


def graph_settings(backend: Backend) -> dict:
    """The few-shot graph runs as the model does: its threads, and the CPU when the model's providers are CPU only."""
    providers = getattr(backend, "providers", None)
    return {"threads": getattr(backend, "threads", None),
            "cpu_only": providers is not None and list(providers) == ["CPUExecutionProvider"]}
