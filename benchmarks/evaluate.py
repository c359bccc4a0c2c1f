"""``edge-eval``'s measurement: run deployed models over a test set, image by image, and report image and pixel metrics
(streamed: memory does not grow with the number of images), the calibrated OK/NG confusion, and with a second model
the deltas and agreement between the two."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from clipad.calibration.thresholds import NormalStats, fit_constants
from clipad.runtime.compare import map_pearson, spearman
from clipad.runtime.decision import CONSTANTS, decision_score
from clipad.runtime.errors import ClipadError

from .dataset import MASK_01, TestSet, load_mask
from .metrics import PixelMetrics, image_metrics

SCHEMA_VERSION = 1


@dataclass
class Run:
    """One model's outputs on one class."""
    records: list[dict] = field(default_factory=list)
    pixels: PixelMetrics = field(default_factory=PixelMetrics)


def _predict(detector, image, class_name: str) -> dict:
    pred = detector.predict(image, class_name)
    amap = pred.anomaly_map
    finite = pred.error is None
    return {"score": pred.score if finite else None, "map_max": pred.map_max if finite else None,
            "map_min": float(amap.min()) if finite else None, "decision_score": pred.decision_score if finite else None,
            "pred": pred.label, "error": pred.error, "_map": amap}


def _decision_scores(detector, run: Run, class_name: str) -> str:
    """Fill in decision scores where the rule needs constants the manifest lacks: fitted on this test set, as the
    official AA-CLIP evaluation does (transductive). Returns where the constants came from."""
    if not CONSTANTS[detector.rule]:
        return "no constants needed"
    if detector.policy.class_calibration(class_name) is not None:
        return "calibration (normal images)"
    rows = [r for r in run.records if r["error"] is None]
    if len(rows) < 2:
        return "not computable"
    stats = NormalStats(np.array([r["map_min"] for r in rows]), np.array([r["map_max"] for r in rows]),
                        np.array([r["score"] for r in rows]))
    constants = fit_constants(detector.rule, stats)
    for r in rows:
        r["decision_score"] = decision_score(detector.rule, constants, r["map_max"], r["score"])
    return "this test set (transductive, as the official AA-CLIP evaluation; no calibration in the manifest)"


def _metrics(detector, run: Run, class_name: str) -> dict:
    source = _decision_scores(detector, run, class_name)
    rows = [r for r in run.records if r["error"] is None and r["decision_score"] is not None]
    labels = np.array([r["label"] == "defect" for r in rows], bool)
    out = {"n_good": int(sum(r["label"] == "good" for r in run.records)),
           "n_defect": int(sum(r["label"] == "defect" for r in run.records)),
           "image": image_metrics(labels, np.array([r["decision_score"] for r in rows])),
           "pixel": run.pixels.result()}
    rule_for = getattr(detector.policy, "rule_for", None)
    decision = {"score": rule_for(class_name) if rule_for else detector.rule, "constants_from": source,
                "precision": detector.backend.precision, "backend": detector.backend.name}
    cal = detector.policy.class_calibration(class_name)
    if cal is not None:
        judged = [r for r in run.records if r["pred"] is not None]
        good = [r for r in judged if r["label"] == "good"]
        bad = [r for r in judged if r["label"] == "defect"]
        false_alarms = sum(r["pred"] == "NG" for r in good)
        misses = sum(r["pred"] == "OK" for r in bad)
        where = detector.policy.calibration
        decision.update(threshold=cal.image_threshold, calibration=f"{cal.method}, target false-alarm rate "
                        f"{cal.target_fpr:g}, {cal.images} normal images, {where.precision} on {where.backend}, "
                        f"{cal.created}",
                        thresholds_from={"precision": where.precision, "backend": where.backend},
                        false_alarm_rate=false_alarms / len(good) if good else None,
                        miss_rate=misses / len(bad) if bad else None,
                        confusion={"true_ng": len(bad) - misses, "false_ng": false_alarms,
                                   "true_ok": len(good) - false_alarms, "missed": misses})
    out["decision"] = decision
    return out


def evaluate(detector, testset: TestSet, class_map: dict[str, str], other=None, save_maps: str | None = None,
             progress=None, fewshot=None) -> dict:
    """The report (see ``edge-eval --help``); ``other`` is a second Detector to compare with; ``fewshot`` a
    ``fewshot_eval.FewShotEval`` (zero-shot, few-shot and fused side by side)."""
    from clipad.runtime.inputs import load_image, original_size
    from clipad.runtime.render import save_npy_atomic

    size = detector.image_size
    report = {"schema_version": SCHEMA_VERSION, "classes": {}, "images": [], "warnings": list(testset.warnings),
              "unreadable": [], "masks_01": []}
    comparison, fewshot_classes = {}, {}
    for cls, samples in testset.classes.items():
        model_class = class_map[cls]
        runs = [Run()] + ([Run()] if other is not None else []) + ([Run(), Run()] if fewshot is not None else [])
        memory = fewshot.memory_for(detector, cls, True) if fewshot is not None else None
        pearson = []
        for sample in samples:
            base = {"class": cls, "defect": sample.defect, "path": sample.path,
                    "label": "defect" if sample.is_defect else "good"}
            try:
                image = load_image(sample.path)
            except ClipadError as exc:
                report["unreadable"].append(str(exc))
                if progress:
                    progress(1)
                continue
            mask = np.zeros((size, size), bool)
            if sample.is_defect:
                mask = None
                if sample.mask_path:
                    try:
                        width, height = original_size(image) or image.size
                        mask, kind = load_mask(sample.mask_path, size, (height, width))
                        if kind == MASK_01:
                            report["masks_01"].append(sample.mask_path)
                    except ClipadError as exc:
                        report["warnings"].append(f"{cls}: {exc}; left out of the pixel metrics")
            if fewshot is not None:
                outputs = fewshot.predict(detector, image, model_class, memory)
            else:
                outputs = [_predict(d, image, model_class) for d in ([detector] + ([other] if other else []))]
            for run, out in zip(runs, outputs):
                if out["error"] is not None:
                    report["warnings"].append(f"{sample.path}: {out['error']}")
                elif mask is not None:
                    run.pixels.add(out["_map"], mask)
                run.records.append({**base, **{k: v for k, v in out.items() if k != "_map"}})
            if other is not None and all(o["error"] is None for o in outputs):
                pearson.append(map_pearson(outputs[0]["_map"], outputs[1]["_map"]))
            if save_maps:
                folder = os.path.join(save_maps, cls, sample.defect)
                os.makedirs(folder, exist_ok=True)
                save_npy_atomic(os.path.join(folder, sample.stem + ".npy"), outputs[0]["_map"])
                for view, out in zip(("fewshot", "fused"), outputs[1:] if fewshot is not None else ()):
                    if out["error"] is None:
                        save_npy_atomic(os.path.join(folder, f"{sample.stem}.{view}.npy"), out["_map"])
            if progress:
                progress(1)
        if not runs[0].records:
            report["warnings"].append(f"{cls}: no readable test image; class left out")
            continue
        report["classes"][cls] = _metrics(detector, runs[0], model_class)
        if fewshot is not None:   # each image's few-shot and fused decision scores beside its zero-shot record
            for r, few, fused in zip(*(run.records for run in runs)):
                r["fewshot_max"], r["fused_score"] = few["decision_score"], fused["decision_score"]
        report["images"] += [{k: v for k, v in r.items() if k != "map_min"} for r in runs[0].records]
        if other is not None:
            theirs = _metrics(other, runs[1], model_class)
            comparison[cls] = _compared(report["classes"][cls], theirs, runs[0], runs[1], pearson)
        if fewshot is not None:
            fewshot_classes[cls] = {"zero_shot": report["classes"][cls], "memory_images": fewshot.sources[cls],
                                    **{view: _metrics(fewshot.view(detector, view), run, model_class)
                                       for view, run in zip(("few_shot", "fused"), runs[1:])}}
    if report["masks_01"]:
        report["warnings"].append(f"{len(report['masks_01'])} mask(s) hold only 0 and 1: read as 0/1 masks (defect "
                                  f"where 1), not as 0/255 masks (listed in masks_01)")
    report["mean"] = _mean(report["classes"])
    if other is not None:
        report["compare"] = {"classes": comparison, "mean": _mean(comparison)}
    if fewshot is not None:
        from .fewshot_eval import VIEWS

        report["fewshot"] = {"k": fewshot.k, "coreset": fewshot.coreset, "seed": fewshot.seed,
                             "memory_from": "<class>/train/good", "classes": fewshot_classes,
                             "mean": {v: _mean({c: per[v] for c, per in fewshot_classes.items()}) for v in VIEWS}}
    return report


def _delta(a: dict, b: dict) -> dict:
    return {k: (b[k] - a[k] if isinstance(a.get(k), float) and isinstance(b.get(k), float) else None)
            for k in METRICS if k in a}


def _compared(ours: dict, theirs: dict, run: Run, other_run: Run, pearson: list[float]) -> dict:
    pairs = [(a, b) for a, b in zip(run.records, other_run.records) if a["error"] is None and b["error"] is None]
    rho = spearman(np.array([a["score"] for a, _ in pairs]), np.array([b["score"] for _, b in pairs])) \
        if len(pairs) >= 3 else None
    judged = [(a["pred"], b["pred"]) for a, b in zip(run.records, other_run.records)
              if a["pred"] is not None and b["pred"] is not None]
    # OK/NG agreement means something only with each side at its own thresholds: a precision judged with another
    # precision's thresholds (the runtime's fallback) flips on any offset between the two, which it does not have.
    def borrows(d: dict) -> bool:
        source = d.get("thresholds_from")
        return source is not None and (source["precision"], source["backend"]) != (d["precision"], d["backend"])

    borrowed = [f"{d['precision']} on {d['backend']} uses the thresholds calibrated for "
                f"{d['thresholds_from']['precision']} on {d['thresholds_from']['backend']}"
                for d in (ours["decision"], theirs["decision"]) if borrows(d)]
    if borrowed:
        judged = []
    return {"ok_ng_note": ("; ".join(borrowed) + ": no agreement reported (edge-calibrate each side)") if borrowed
            else None,
            "image": _delta(ours["image"], theirs["image"]), "pixel": _delta(ours["pixel"], theirs["pixel"]),
            "candidate": {"image": theirs["image"], "pixel": theirs["pixel"], "decision": theirs["decision"]},
            "map_pearson_min": min(pearson) if pearson else None,
            "map_pearson_mean": float(np.mean(pearson)) if pearson else None, "score_spearman": rho,
            "ok_ng_agreement": sum(a == b for a, b in judged) / len(judged) if judged else None,
            "ok_ng_images": len(judged)}


METRICS = ("auroc", "ap", "f1_max", "aupro")


def _average(values: list, how=np.mean) -> float | None:
    values = [v for v in values if isinstance(v, float)]
    return float(how(values)) if values else None


def _mean(per_class: dict) -> dict:
    """Unweighted mean over classes of every metric (None where no class has it); the minimum for map_pearson_min."""
    rows = list(per_class.values())
    out = {group: {k: _average([r[group].get(k) for r in rows]) for k in METRICS if any(k in r[group] for r in rows)}
           for group in ("image", "pixel") if rows}
    for key in ("map_pearson_min", "map_pearson_mean", "score_spearman", "ok_ng_agreement"):
        if any(key in r for r in rows):
            out[key] = _average([r[key] for r in rows], min if key == "map_pearson_min" else np.mean)
    return out
