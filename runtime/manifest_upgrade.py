"""Older manifests, upgraded in memory to the current schema (the next write stores the current version).

1 (clipad-edge 0.1.0) → 2: model provenance moves under ``model.details``; gate reports take the comparator's shape.
2 → 3: the CPU INT8 file is the precision ``int8-cpu`` (2 stored ``int8`` + target ``cpu``); the decision-score rule
lives only in ``model.decision_score`` (2 could leave it to the kind and also stored it in each calibration); each
class's thresholds carry their own provenance (2 stored method, target, image count, folder, hash and date once per
precision × backend, so calibrating one class rewrote another's description: upgraded classes get the stored one,
marked as such).
3 → 4: precision gates may carry an OK/NG decision check (``gate.decision``, limits ``decision_*``) and ``bf16`` has
its own file (``model.bf16.onnx``; 3 had none: its bf16 was OpenVINO's hint on ``model.onnx``). Nothing to convert.
4 → 5, 5 → 6, 6 → 7: optional additions only (the parity gate's rounding pins; few-shot memories and
``patch_features``; the gates' comparison of ``patch_features``).
"""
from __future__ import annotations

from . import schema
from .compare import Comparison, GateLimits, GateReport, OutputError

_V1_MODEL_KEYS = ("kind", "arch", "image_size", "class_names", "prompt_names", "domain", "anchor_sha256",
                  "random_init")
_V2_CPU_INT8 = ("int8", "cpu")   # (precision, target) of schema 2's CPU INT8 file
_CPU_INT8 = "int8-cpu"
_V2_PROVENANCE = ("method", "target_fpr", "images", "normal", "images_sha256", "created")


def rule_for(kind: str, domain: str | None) -> str:
    """The decision-score rule that schema 1 and 2 left to the model kind."""
    if kind == "aaclip":
        return "aaclip_medical" if domain == "medical" else "aaclip_industrial"
    return "map_max" if kind == "clip" else "image_score"


def upgrade(data: dict, version: int) -> dict:
    """``data`` of schema ``version`` as a current-schema document (SchemaError for a damaged one)."""
    steps = {1: upgrade_v1, 2: upgrade_v2, 3: upgrade_v3, 4: upgrade_v4, 5: upgrade_v5, 6: upgrade_v6}
    for step in range(version, max(steps) + 1):
        try:
            data = steps[step](data)
        except (TypeError, AttributeError, ValueError, KeyError, IndexError) as exc:   # a damaged older document
            raise schema.SchemaError(f"version-{step} manifest cannot be upgraded ({type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    return data


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


def upgrade_v2(data: dict) -> dict:
    out = dict(data)
    model = dict(data["model"])
    if not model.get("decision_score"):
        model["decision_score"] = rule_for(model["kind"], model.get("domain"))
    out["model"] = model
    files = {}
    for name, entry in (data.get("files") or {}).items():
        entry = dict(entry)
        target = entry.pop("target", None)
        if (entry.get("precision"), target) == _V2_CPU_INT8:
            entry["precision"] = _CPU_INT8
        files[name] = entry
    out["files"] = files
    calibrations = []
    for old in data.get("calibrations") or []:
        old = dict(old)
        shared = {k: old.pop(k) for k in _V2_PROVENANCE if k in old}
        old.pop("holdout", None)
        classes = {}
        for name, cal in (old.get("classes") or {}).items():
            cal = dict(cal)
            decision = dict(cal.get("decision") or {})
            if decision.get("rule") == model["decision_score"]:
                decision.pop("rule")
            cal["decision"] = decision
            for key, value in shared.items():
                cal.setdefault(key, value)
            cal["provenance_upgraded"] = ("schema 2 stored this description once per precision and backend: it may "
                                          "describe another class's calibration run")
            classes[name] = cal
        old["classes"] = classes
        calibrations.append(old)
    out["calibrations"] = calibrations
    return out


def upgrade_v3(data: dict) -> dict:
    """Schema 4 only adds optional fields (the precision gates' OK/NG ``decision``)."""
    return data


def upgrade_v4(data: dict) -> dict:
    """Schema 5 only adds optional fields (the parity gate's ``rounding_pins``)."""
    return data


def upgrade_v5(data: dict) -> dict:
    """Schema 6 only adds optional parts: a ``patch_features`` output with ``fewshot.onnx``, and few-shot memories in
    calibrations (a schema-5 reader would apply their fused thresholds to zero-shot scores, so it must refuse)."""
    return data


def upgrade_v6(data: dict) -> dict:
    """Schema 7 only adds an optional field: a gate's comparison of ``patch_features`` (and its limit)."""
    return data
