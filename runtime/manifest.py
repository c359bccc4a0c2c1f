"""The versioned ``manifest.json`` sidecar, as one typed schema: the only thing the runtime reads about a model.

Written by ``export-engine`` next to the model files (nothing is ever prepended to an ONNX or engine file, so
trtexec / DeepStream load them as they are); hashes tie it to the exact files. Every writer and reader goes through
``Manifest.read`` / ``Manifest.write``: one version check, one validation, one atomic writer.

Versions: 2 is current. 1 (clipad-edge 0.1.0) is read and upgraded in memory (its reports get the comparator's shape);
the next write stores version 2. A newer version than this runtime knows is refused with a one-line error.
Fields added later without breaking readers keep the version; unknown keys are preserved on rewrite.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from . import schema
from .atomic import write_json_atomic
from .compare import Comparison, GateLimits, GateReport, OutputError
from .errors import ClipadError

SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _plain_file_name(name: str, where: str) -> None:
    """Model files live in the model folder itself: a path, '..' or an absolute name is refused."""
    if not name or name in (".", "..") or os.path.basename(name) != name or "\\" in name or "\0" in name:
        raise schema.SchemaError(f"{where}: {name!r} is not a plain file name inside the model folder")


@dataclass
class BatchRange:
    min: int
    max: int
    opt: int

    def validate(self, where: str) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise schema.SchemaError(f"{where}: need 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}")

    @property
    def fixed(self) -> bool:
        return self.min == self.max


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[int | str]      # "batch" for a dynamic batch dimension


@dataclass
class InputSpec(TensorSpec):
    layout: str = "NHWC"
    color: str = "RGB"
    host_preprocessing: str = ""
    in_graph: dict = field(default_factory=dict)


@dataclass
class ModelInfo:
    kind: str
    arch: str
    image_size: int
    class_names: list[str]
    prompt_names: list[str] = field(default_factory=list)
    domain: str | None = None
    decision_score: str | None = None             # rule name (runtime.decision.RULES); None: derived from the kind
    anchor_sha256: str = ""
    random_init: bool = False
    details: dict = field(default_factory=dict)   # model-kind provenance (weights format, checkpoint epoch, blur …)

    def validate(self, where: str) -> None:
        if not self.class_names:
            raise schema.SchemaError(f"{where}.class_names: empty")


@dataclass
class FileEntry:
    sha256: str
    bytes: int
    precision: str
    format: str = "onnx"
    opset: int | None = None
    target: str | None = None     # "cpu" for a variant made for CPU runtimes


@dataclass
class EngineTarget:
    compute_capability: str
    gpu_name: str | None = None
    aot: bool = False


@dataclass
class EngineEntry:
    file: str
    precision: str
    flavor: str
    trt_version: str
    target: EngineTarget
    sha256: str
    bytes: int
    batch: BatchRange
    onnx: str = "model.onnx"
    onnx_sha256: str = ""
    version_compatible: bool = False
    build_seconds: float | None = None
    built: str | None = None
    build_command: str | None = None

    def validate(self, where: str) -> None:
        _plain_file_name(self.file, f"{where}.file")


@dataclass
class PrecisionReport:
    gate: GateReport
    conversion: dict = field(default_factory=dict)   # what the converter did (tool, kept-float nodes, calibration …)


@dataclass
class ClassCalibration:
    """One class's decision from normal images (``edge-calibrate``): OK/NG on the decision score, defect regions on
    the map, p-values against the stored normal scores."""
    decision: dict                   # the decision-score rule's constants, e.g. AA-CLIP's {"p_min","p_max","i_min","i_max"}
    image_threshold: float           # NG when the decision score >= this
    pixel_threshold: float           # map values >= this are defect regions
    normal_scores: list[float]       # sorted decision scores of the calibration images (conformal p-values)
    display_range: list[float]       # fixed overlay colour range [low, high]
    holdout_images: int = 0
    holdout_false_alarms: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def holdout_fpr(self) -> float | None:
        return self.holdout_false_alarms / self.holdout_images if self.holdout_images else None

    def validate(self, where: str) -> None:
        if not self.normal_scores or list(self.normal_scores) != sorted(self.normal_scores):
            raise schema.SchemaError(f"{where}.normal_scores: must be a non-empty ascending list")
        if len(self.display_range) != 2:
            raise schema.SchemaError(f"{where}.display_range: expected [low, high]")


@dataclass
class Calibration:
    """Thresholds for one precision on one backend (a model folder can hold several)."""
    precision: str
    backend: str
    method: str                      # conformal, quantile or meanstd
    target_fpr: float
    images: int                      # normal images the thresholds were fitted on
    holdout: int                     # normal images held out to measure the false-alarm rate
    normal: str                      # where the normal images came from
    images_sha256: str               # over the sorted per-file sha256s of all normal images used
    created: str
    classes: dict[str, ClassCalibration]
    extra: dict = field(default_factory=dict)


@dataclass
class Manifest:
    schema_version: int
    model: ModelInfo
    input: InputSpec
    outputs: list[TensorSpec]
    batch: BatchRange
    files: dict[str, FileEntry]
    sources: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)
    parity: GateReport | None = None
    precisions: dict[str, PrecisionReport] = field(default_factory=dict)
    calibrations: list[Calibration] = field(default_factory=list)
    engines: list[EngineEntry] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def validate(self, where: str) -> None:
        for name in self.files:
            _plain_file_name(name, f"{where}.files")
        if "model.onnx" not in self.files:
            raise schema.SchemaError(f"{where}.files: no model.onnx entry")

    # ---- reading and writing ---------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data, where: str = MANIFEST_NAME) -> "Manifest":
        if not isinstance(data, dict) or "schema_version" not in data:
            raise ClipadError(f"{where}: not a clipad manifest (no schema_version)")
        version = data["schema_version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ClipadError(f"{where}: schema_version {version!r} is not a version number")
        if version > SCHEMA_VERSION:
            raise ClipadError(f"{where}: schema_version {version} is newer than this clipad-edge supports "
                              f"({SCHEMA_VERSION}); upgrade clipad-edge")
        try:
            if version == 1:
                try:
                    data = upgrade_v1(data)
                except (TypeError, AttributeError, ValueError, KeyError) as exc:   # a damaged version-1 document
                    raise schema.SchemaError(f"version-1 manifest cannot be upgraded ({type(exc).__name__}: "
                                             f"{str(exc).splitlines()[0][:120]})") from None
            return schema.load(cls, data, "manifest")
        except schema.SchemaError as exc:
            raise ClipadError(f"{where}: invalid manifest: {exc}; re-export with export-engine") from None

    def to_dict(self) -> dict:
        out = schema.dump(self)
        out["schema_version"] = SCHEMA_VERSION
        return out

    @classmethod
    def read(cls, model_dir: str) -> "Manifest":
        """``model_dir/manifest.json``, validated (schema only; ``verify_file`` checks hashes)."""
        path = os.path.join(model_dir, MANIFEST_NAME)
        if not os.path.isdir(model_dir):
            raise ClipadError(f"--model {model_dir}: no such model directory")
        if not os.access(model_dir, os.R_OK | os.X_OK):
            raise ClipadError(f"--model {model_dir}: permission denied (the folder is not readable by this user)")
        if not os.path.isfile(path):
            raise ClipadError(f"--model {model_dir}: no {MANIFEST_NAME} (not a directory written by export-engine)")
        try:
            with open(path) as fh:
                data = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ClipadError(f"{path}: unreadable manifest ({exc})") from None
        return cls.from_dict(data, path)

    def write(self, model_dir: str) -> str:
        """Atomically (temp file + rename) replace ``model_dir/manifest.json``."""
        return write_json_atomic(os.path.join(model_dir, MANIFEST_NAME), self.to_dict())

    # ---- helpers every consumer needs ------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    def calibration(self, precision: str, backend: str) -> tuple[Calibration | None, str | None]:
        """The calibration for this precision (this backend's if there is one), else another precision's with a
        warning text, else (None, None)."""
        same = [c for c in self.calibrations if c.precision == precision]
        exact = [c for c in same if c.backend == backend]
        if exact or same:
            return (exact or same)[0], None
        if self.calibrations:
            other = self.calibrations[0]
            return other, (f"no calibration for {precision}; using the {other.precision} thresholds (calibrated on "
                           f"{other.backend}): run edge-calibrate --precision {precision} for this precision's own")
        return None, None

    def set_calibration(self, calibration: Calibration) -> None:
        """Add, replacing the one for the same precision and backend."""
        self.calibrations = [c for c in self.calibrations
                             if (c.precision, c.backend) != (calibration.precision, calibration.backend)]
        self.calibrations.append(calibration)

    def verify_file(self, model_dir: str, name: str) -> str:
        """Path of a model file listed in the manifest, after checking its size and sha256."""
        entry = self.files.get(name)
        if entry is None:
            raise ClipadError(f"{model_dir}: manifest lists no file {name!r} (has: {', '.join(self.files)})")
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            raise ClipadError(f"{path}: listed in the manifest but missing")
        if os.path.getsize(path) != entry.bytes or sha256_file(path) != entry.sha256:
            raise ClipadError(f"{path}: sha256 does not match the manifest (file changed or truncated); re-export")
        return path


PRECISIONS = ("fp32", "fp16", "int8", "int8-cpu")   # int8: Q/DQ for TensorRT; int8-cpu: dynamic INT8 for CPUs


def precision_file(precision: str) -> str:
    """The ONNX file of a precision in an export folder."""
    if precision not in PRECISIONS:
        raise ClipadError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return "model.onnx" if precision == "fp32" else f"model.{precision}.onnx"


def file_entry(path: str, precision: str, opset: int | None) -> FileEntry:
    return FileEntry(sha256=sha256_file(path), bytes=os.path.getsize(path), precision=precision, opset=opset)


# ---- version 1 (clipad-edge 0.1.0) -----------------------------------------------------------------------------------
_V1_MODEL_KEYS = ("kind", "arch", "image_size", "class_names", "prompt_names", "domain", "anchor_sha256",
                  "random_init")


def _v1_gate(old: dict, name: str, reference: str, candidate: str) -> dict:
    """A version-1 parity or precision-gate report in the comparator's shape (per-image lists were not stored)."""
    limits = old.get("limits") or {}
    names = list(old.get("verify_images") or [])
    amap, score = old.get("anomaly_map") or {}, old.get("image_score") or {}
    comparison = Comparison(
        images=int(old.get("images", 0)), names=names,
        anomaly_map=OutputError(amap.get("max_abs", old.get("map_max_abs", 0.0)), amap.get("max_rel", 0.0)),
        image_score=OutputError(score.get("max_abs", old.get("score_max_abs", 0.0)), score.get("max_rel", 0.0)),
        map_range=old.get("map_range", 0.0), map_pearson=[],
        map_pearson_min=old.get("map_pearson_min"), map_pearson_mean=old.get("map_pearson_mean"),
        score_spearman=old.get("score_spearman_min"), score_reference_std=old.get("score_fp32_std", 0.0),
        nonfinite_images={"reference": [], "candidate": []}, constant_map_images=[])
    gate_limits = GateLimits(map_error_over_range=limits.get("map_error_over_range"),
                             score_max_abs=limits.get("image_score_max_abs"),
                             map_pearson_min=limits.get("map_pearson_min"),
                             score_spearman_min=limits.get("score_spearman_min"))
    report = GateReport(name=name, reference=reference, candidate=candidate, comparison=comparison,
                        limits=gate_limits, passed=bool(old.get("passed")),
                        accepted_despite_failure=bool(old.get("accepted_despite_failure", False)))
    return schema.dump(report)


def upgrade_v1(data: dict) -> dict:
    """Version 1 → 2: model provenance moves under ``model.details``, reports take the comparator's shape."""
    out = dict(data)
    model = dict(data.get("model") or {})
    out["model"] = {k: model[k] for k in _V1_MODEL_KEYS if k in model}
    out["model"]["details"] = {k: v for k, v in model.items() if k not in _V1_MODEL_KEYS}
    if "image_size" not in out["model"]:
        shape = (data.get("input") or {}).get("shape") or [None, None]
        out["model"]["image_size"] = shape[1]
    if isinstance(data.get("parity"), dict):
        out["parity"] = _v1_gate(data["parity"], "parity", "torch", data["parity"].get("backend", "onnxruntime"))
    precisions = {}
    for precision, info in (data.get("precisions") or {}).items():
        info = dict(info)
        gate = info.pop("gate", {})
        precisions[precision] = {"gate": _v1_gate(gate, precision, "onnxruntime fp32",
                                                  f"onnxruntime {precision}"), "conversion": info}
    out["precisions"] = precisions
    if data.get("thresholds"):  # version 1 had the field but nothing wrote it
        raise schema.SchemaError("thresholds from an unknown writer; run edge-calibrate again")
    out.pop("thresholds", None)
    return out
