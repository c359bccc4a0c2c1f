"""The calibration records of a manifest (``edge-calibrate`` writes them): per precision × backend, and per class
with its own provenance. Part of the one schema in ``manifest``; every decision number must be finite after parsing,
whatever the JSON spelled."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import precisions, schema
from .decision import CONSTANTS, FUSED

MEMORY_KEYS = {"file": str, "sha256": str, "model_file": str, "model_sha256": str, "rows": int, "taps": int,
               "channels": int, "images": int, "image_sha256s": list, "coreset": (float, type(None)), "seed": int,
               "source": str, "created": str}


def check_memory(memory: dict, where: str) -> None:
    """A few-shot memory record: every key with its type, a plain ``memory-*.npy`` file name beside the manifest."""
    for key, kind in MEMORY_KEYS.items():
        if key not in memory:
            raise schema.SchemaError(f"{where}: no {key!r}")
        value = memory[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise schema.SchemaError(f"{where}.{key}: {value!r} has the wrong type")
    name = memory["file"]
    if "/" in name or "\\" in name or not (name.startswith("memory-") and name.endswith(".npy")):
        raise schema.SchemaError(f"{where}.file: {name!r} is not a memory-*.npy file beside the manifest")
    for key in ("rows", "taps", "channels", "images"):
        if memory[key] < 1:
            raise schema.SchemaError(f"{where}.{key}: must be at least 1")
    if memory["coreset"] is not None:
        _finite(memory["coreset"], f"{where}.coreset")
        if not 0 < memory["coreset"] <= 1:
            raise schema.SchemaError(f"{where}.coreset: must be in (0, 1]")


def precision_name(name: str, where: str) -> None:
    if name not in precisions.PRECISIONS:
        raise schema.SchemaError(f"{where}: unknown precision {name!r} (known: {', '.join(precisions.NAMES)})")


def _finite(value, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise schema.SchemaError(f"{where}: must be a finite number, got {value!r}")



@dataclass
class ClassCalibration:
    """One class's decision from normal images (``edge-calibrate``), with its own provenance: OK/NG on the decision
    score, defect regions on the map, p-values against the stored normal scores."""
    decision: dict                   # the decision-score rule's constants, e.g. AA-CLIP's {"p_min","p_max","i_min","i_max"}
    image_threshold: float           # NG when the decision score >= this
    pixel_threshold: float           # map values >= this are defect regions
    normal_scores: list[float]       # sorted decision scores of the calibration images (conformal p-values)
    display_range: list[float]       # fixed overlay colour range [low, high]
    method: str                      # conformal, quantile or meanstd
    target_fpr: float
    images: int                      # normal images the thresholds were fitted on
    normal: str                      # where the normal images came from
    images_sha256: str               # over the sorted per-file sha256s of the normal images used
    created: str
    holdout_images: int = 0          # normal images held out to measure the false-alarm rate
    holdout_false_alarms: int = 0
    memory: dict | None = None       # the few-shot memory the thresholds were fitted with (``fewshot.MEMORY_KEYS``)
    extra: dict = field(default_factory=dict)

    @property
    def holdout_fpr(self) -> float | None:
        return self.holdout_false_alarms / self.holdout_images if self.holdout_images else None

    def validate(self, where: str) -> None:
        for name in ("image_threshold", "pixel_threshold"):
            _finite(getattr(self, name), f"{where}.{name}")
        if not self.normal_scores:
            raise schema.SchemaError(f"{where}.normal_scores: empty")
        for i, value in enumerate(self.normal_scores):
            _finite(value, f"{where}.normal_scores[{i}]")
        if list(self.normal_scores) != sorted(self.normal_scores):
            raise schema.SchemaError(f"{where}.normal_scores: must be in ascending order")
        if len(self.display_range) != 2:
            raise schema.SchemaError(f"{where}.display_range: expected [low, high]")
        for i, value in enumerate(self.display_range):
            _finite(value, f"{where}.display_range[{i}]")
        _finite(self.target_fpr, f"{where}.target_fpr")
        if not 0 < self.target_fpr < 1:
            raise schema.SchemaError(f"{where}.target_fpr: must be between 0 and 1, got {self.target_fpr}")
        for key, value in self.decision.items():
            if key != "rule":
                _finite(value, f"{where}.decision.{key}")
        if self.memory is not None:
            check_memory(self.memory, f"{where}.memory")

    def check_rule(self, rule: str, where: str) -> None:
        """The constants the model's decision-score rule needs, and no other rule named (with a few-shot memory the
        rule is ``fused``, and only then)."""
        if self.memory is not None:
            if self.decision.get("rule") != FUSED:
                raise schema.SchemaError(f"{where}.decision.rule: thresholds with a few-shot memory decide on the "
                                         f"{FUSED!r} score; re-run edge-calibrate --memory")
            return
        if self.decision.get("rule", rule) != rule:
            raise schema.SchemaError(f"{where}.decision.rule: {self.decision['rule']!r} is not the model's decision "
                                     f"score {rule!r} (model.decision_score is the one source); re-run edge-calibrate")
        missing = [k for k in CONSTANTS[rule] if k not in self.decision]
        if missing:
            raise schema.SchemaError(f"{where}.decision: the {rule} rule needs {', '.join(missing)}")
        for low, high in (("p_min", "p_max"), ("i_min", "i_max")):
            if low in self.decision and high in self.decision and not self.decision[high] > self.decision[low]:
                raise schema.SchemaError(f"{where}.decision: {high} must be above {low}")


@dataclass
class Calibration:
    """Thresholds for one precision on one backend, per class (a model folder can hold several)."""
    precision: str
    backend: str
    classes: dict[str, ClassCalibration]
    extra: dict = field(default_factory=dict)

    def validate(self, where: str) -> None:
        precision_name(self.precision, f"{where}.precision")
