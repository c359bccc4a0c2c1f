"""edge-doctor --model DIR: what ``--backend auto`` would run here and why, and which listed engines fit this box."""
from __future__ import annotations

import os

from .. import precisions
from ..errors import ClipadError
from ..manifest import Manifest
from .checks import Report


def check_model(report: Report, model_dir: str, gpu: dict | None) -> None:
    from ..backends import cuda_buffers as cb
    from ..backends.tensorrt import import_tensorrt, rebuild_command, select_engine, version_mismatch

    if not os.path.isdir(model_dir):
        raise ClipadError(f"--model {model_dir}: no such folder (give a folder written by export-engine)")
    manifest = Manifest.read(model_dir)
    cc = gpu["compute_capability"] if gpu else None
    engines = []
    for entry in manifest.engines:
        fits, why = True, None
        if cc is None:
            fits, why = False, "no CUDA GPU here"
        elif entry.target.compute_capability != cc:
            fits, why = False, f"built for sm {entry.target.compute_capability}, this GPU is sm {cc}"
        else:
            try:
                module, name = import_tensorrt(entry)
                why = version_mismatch(entry, name, str(getattr(module, "__version__", "?")))
                fits = why is None
            except ClipadError as exc:
                fits, why = False, str(exc)
        if fits and not os.path.isfile(os.path.join(model_dir, entry.file)):
            fits, why = False, "listed in the manifest but the file is missing"
        engines.append({"file": entry.file, "precision": entry.precision, "flavor": entry.flavor,
                        "compute_capability": entry.target.compute_capability, "trt_version": entry.trt_version,
                        "fits": fits, "why_not": why})
    chosen = select_engine(manifest, cc) if cc else None
    usable = chosen is not None and next(e for e in engines if e["file"] == chosen.file)["fits"]
    if usable:
        auto = {"backend": "tensorrt", "precision": chosen.precision, "file": chosen.file,
                "why": f"a {chosen.precision} engine built for this GPU ({gpu['name']}, sm {cc}) loads with the "
                       "installed TensorRT"}
    else:
        if gpu is None:
            why = f"no CUDA GPU here ({cb.no_gpu_reason()})"
        elif chosen is None:
            why = f"no engine listed for this GPU ({gpu['name']}, sm {cc})"
        else:
            why = next(e for e in engines if e["file"] == chosen.file)["why_not"]
        providers = [p["name"] for p in (report.sections.get("onnxruntime") or {}).get("providers", []) if p["works"]]
        gpu_provider = next((p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in providers),
                            None)
        fp32 = precisions.REFERENCE.file
        auto = {"backend": "onnxruntime", "precision": precisions.REFERENCE.name, "file": fp32,
                "providers": [gpu_provider or "CPUExecutionProvider"],
                "why": f"ONNX Runtime, because {why}"}
        if not providers:
            auto["why"] += "; but ONNX Runtime does not work here either (see problems)"
    section = {"dir": model_dir, "model": manifest.model.kind, "arch": manifest.model.arch,
               "image_size": manifest.model.image_size, "files": sorted(manifest.files), "engines": engines,
               "auto": auto}
    if gpu is not None and not any(e["fits"] for e in engines):
        section["build"] = rebuild_command(model_dir)
        report.notes.append(f"no listed engine fits this GPU; build one here: {section['build']}")
    report.sections["model"] = section
