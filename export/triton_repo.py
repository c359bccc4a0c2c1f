"""``export-engine --from-onnx DIR --triton-repo REPO``: an export as models of a Triton model repository.

    REPO/NAME/config.pbtxt + 1/model.onnx (onnxruntime_onnx) | 1/model.plan (tensorrt_plan)
                             | 1/model.py + the export's files (python: the lean runtime's ONNX Runtime backend)
    REPO/NAME/manifest.json  the export's manifest (also inside every config, parameter clipad_manifest)
    REPO/NAME_pre            Python backend: encoded image bytes → edge-detect's preprocessing → uint8 [S, S, 3]
    REPO/NAME_post           Python backend: maps, scores → decision score, normalized score, p-value, label
    REPO/NAME_pipeline       ensemble pre → NAME → post: JPEG/PNG bytes in, map, score and label out

Each model folder is written beside the repository and renamed into place; folders this command did not write
are never replaced. torch-free: it only copies files and writes text."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil

from clipad.runtime import precisions, schema
from clipad.runtime.atomic import make_temp_dir_beside, remove_stale_temp_dirs, replace_dir
from clipad.runtime.errors import ClipadError
from clipad.runtime.fewshot import GRAPH_FILE as FEWSHOT_GRAPH
from clipad.runtime.fewshot import features_spec
from clipad.runtime.manifest import Manifest
from clipad.runtime.serving.triton_models import (
    BACKEND_PARAMETER,
    MANIFEST_PARAMETER,
    POST_OUTPUTS,
    PRECISION_PARAMETER,
)

from .options import TritonOptions

log = logging.getLogger("clipad")
FLAVORS = ("auto", "tensorrt", "onnxruntime", "python")
ACCELERATORS = ("none", "tensorrt", "openvino")
SHIM = "from clipad.runtime.serving.triton_models import {cls} as TritonPythonModel  # noqa: F401\n"
SHIM_HEADER = """# Written by export-engine --triton-repo. Needs clipad-edge importable by Triton's Python backend
# (pip install clipad-edge in the server's environment; edge-serve arranges it for its own environment).
import os
import site

for _path in os.environ.get("CLIPAD_SITE_PACKAGES", "").split(os.pathsep):
    if _path:
        site.addsitedir(_path)   # also reads .pth files (editable installs), which PYTHONPATH does not

"""


def pbtxt_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def parameters(values: dict[str, str]) -> str:
    return "".join(f"parameters {{ key: {pbtxt_string(k)} value {{ string_value: {pbtxt_string(v)} }} }}\n"
                   for k, v in values.items())


def tensor(name: str, dtype: str, dims: list[int]) -> str:
    return f"  {{ name: {pbtxt_string(name)} data_type: {dtype} dims: [ {', '.join(map(str, dims))} ] }}"


def tensors(kind: str, items: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def write_triton_repository(model_dir: str, options: TritonOptions, precision: str) -> dict[str, str]:
    """Write the four models serving ``precision``; returns {model name: folder}. ``options.accelerator``
    (onnxruntime flavor): none (Triton's default: CUDA on GPU instances, else CPU), tensorrt (ONNX Runtime's TensorRT
    provider, FP16 when serving fp16) or openvino (CPU instances)."""
    repo, name, flavor, accelerator = options.repo, options.name, options.flavor, options.accelerator
    instances, max_queue_delay_us = options.instances, options.max_queue_delay_us
    max_batch, engine = options.max_batch, options.engine
    model_dir = os.path.abspath(model_dir)
    manifest = Manifest.read(model_dir)
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(model_dir.rstrip(os.sep)))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,100}", name):
        raise ClipadError(f"--triton-name {name!r}: use letters, digits, '_', '.', '-' (a Triton model name)")
    if flavor not in FLAVORS:
        raise ClipadError(f"--triton-backend {flavor!r}: choose one of {', '.join(FLAVORS)}")
    if accelerator not in ACCELERATORS:
        raise ClipadError(f"--triton-accelerator {accelerator!r}: choose one of {', '.join(ACCELERATORS)}")
    if instances < 1 or max_queue_delay_us < 0:
        raise ClipadError("--instances must be at least 1 and --max-queue-delay-us at least 0")
    if flavor == "auto":
        flavor = "tensorrt" if manifest.engines else "onnxruntime"
    repo = os.path.abspath(repo)
    if repo == model_dir or repo.startswith(model_dir + os.sep) or model_dir.startswith(repo + os.sep):
        raise ClipadError(f"--triton-repo {repo}: must not be the export folder, inside it, or contain it")
    if os.path.exists(repo) and not os.path.isdir(repo):
        raise ClipadError(f"--triton-repo {repo}: exists and is not a folder")
    os.makedirs(repo, exist_ok=True)
    names = {"model": name, "pre": f"{name}_pre", "post": f"{name}_post", "pipeline": f"{name}_pipeline"}
    for folder in names.values():
        _check_owned(os.path.join(repo, folder))

    model_batch = _model_batch(manifest, flavor, max_batch)
    if accelerator != "none" and flavor != "onnxruntime":
        raise ClipadError(f"--triton-accelerator {accelerator} is for --triton-backend onnxruntime")
    precisions.get(precision)
    served = served_manifest(manifest, flavor, precision)
    served.extra["triton"] = {"flavor": flavor, "precision": precision, "accelerator": accelerator}
    if flavor == "tensorrt":
        entry = _engine(manifest, precision, engine)
        served.extra["triton"].update(engine=entry.file, trt_version=entry.trt_version, flavor=entry.flavor,
                                      compute_capability=entry.target.compute_capability)
    common = {MANIFEST_PARAMETER: json.dumps(served.to_dict(), separators=(",", ":"), ensure_ascii=False),
              PRECISION_PARAMETER: _served_precision(manifest, flavor, precision, engine),
              BACKEND_PARAMETER: {"python": "onnxruntime"}.get(flavor, flavor)}
    written = {}
    remove_stale_temp_dirs(os.path.join(repo, name), "partial")
    staging = make_temp_dir_beside(os.path.join(repo, name), "partial")
    try:
        for role, folder in names.items():
            target = os.path.join(staging, folder)
            os.makedirs(os.path.join(target, "1"))
            if role == "model":
                config = _write_model(model_dir, manifest, served, target, folder, flavor, precision, engine,
                                      model_batch, instances, max_queue_delay_us, common) + _accelerator(
                                          accelerator, precision)
                shutil.copyfile(os.path.join(model_dir, "manifest.json"), os.path.join(target, "manifest.json"))
            elif role == "pipeline":
                config = _pipeline_config(folder, names, manifest, model_batch)
            else:
                config = _python_config(folder, role, manifest, model_batch, instances, max_queue_delay_us, common)
                _write_shim(target, "Preprocess" if role == "pre" else "Postprocess")
            with open(os.path.join(target, "config.pbtxt"), "w") as fh:
                fh.write(config)
        for folder in names.values():
            replace_dir(os.path.join(staging, folder), os.path.join(repo, folder))
            written[folder] = os.path.join(repo, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def _check_owned(folder: str) -> None:
    config = os.path.join(folder, "config.pbtxt")
    if not os.path.exists(folder):
        return
    try:
        with open(config) as fh:
            text = fh.read()
        ours = MANIFEST_PARAMETER in text or "clipad_pipeline" in text
    except OSError:
        ours = False
    if not ours:
        raise ClipadError(f"{folder} exists and was not written by export-engine --triton-repo; refusing to replace "
                          f"it (choose another --triton-name or remove it)")


def _model_batch(manifest: Manifest, flavor: str, max_batch: int | None) -> int:
    """Triton's max_batch_size for the model (the batch dimension is implicit in its dims)."""
    lo, hi = manifest.batch.min, manifest.batch.max
    if flavor == "python":
        value = max_batch or max(8, hi)     # the lean runtime splits and pads to the file's own batch range
    else:
        if lo != 1:
            raise ClipadError(f"the export's batch range is [{lo}, {hi}]; Triton sends batches of 1 … max_batch_size: "
                              f"re-export with --dynamic-batch 1:N (or --batch 1), or use --triton-backend python")
        if max_batch and max_batch != hi:
            raise ClipadError(f"--triton-max-batch {max_batch}: the {flavor} model's batch range is fixed by the "
                              f"export (1 … {hi}); re-export with --dynamic-batch 1:{max_batch}")
        value = hi
    if value < 1:
        raise ClipadError(f"--triton-max-batch {value}: must be at least 1")
    return value


def _served_precision(manifest: Manifest, flavor: str, precision: str, engine: str | None) -> str:
    if flavor == "tensorrt":
        return _engine(manifest, precision, engine).precision
    return precision


def _engine(manifest: Manifest, precision: str, engine: str | None):
    listed = [e for e in manifest.engines if (engine and e.file == engine) or (not engine and e.precision == precision)]
    if not listed:
        raise ClipadError(f"--triton-backend tensorrt: the export lists no {engine or precision + ' engine'}; build "
                          f"one with the server's GPU and TensorRT version (export-engine --from-onnx DIR --precision "
                          f"{precision} on a machine like the server, or inside the Triton container), or serve "
                          f"--triton-backend onnxruntime")
    return listed[-1]


def _verified_engine(model_dir: str, entry) -> str:
    from clipad.runtime.manifest import sha256_file

    path = os.path.join(model_dir, entry.file)
    if not os.path.isfile(path) or os.path.getsize(path) != entry.bytes or sha256_file(path) != entry.sha256:
        raise ClipadError(f"{path}: missing, or its sha256 does not match the manifest; rebuild the engine")
    return path


def served_files(manifest: Manifest, precision: str) -> set[str]:
    """The files the python flavor ships: the FP32 reference, the precision's file and, when the export has it, the
    precision's CPU substitute (that flavor runs ONNX Runtime on the CPU, which then picks it)."""
    wanted = precisions.get(precision)
    names = {precisions.REFERENCE.file, wanted.file, FEWSHOT_GRAPH}
    if wanted.cpu_substitute:
        names.add(precisions.get(wanted.cpu_substitute).file)
    return {n for n in names if n in manifest.files}


def served_manifest(manifest: Manifest, flavor: str, precision: str) -> Manifest:
    """The manifest the served model carries: the export's, with only the files the served model uses."""
    data = manifest.to_dict()
    keep = served_files(manifest, precision) if flavor == "python" else set(data["files"])
    data["files"] = {k: v for k, v in data["files"].items() if k in keep}
    if flavor != "tensorrt":
        data["engines"] = []
    if flavor != "python":   # only the python flavor runs the few-shot graph: memory-fitted thresholds would be
        for calibration in data.get("calibrations") or []:   # applied to zero-shot outputs
            dropped = [n for n, c in calibration["classes"].items() if c.get("memory")]
            for name in dropped:
                del calibration["classes"][name]
                log.warning("WARNING: class %r of the %s calibration has a few-shot memory, which only the python "
                            "flavor serves; the %s model carries no thresholds for it", name,
                            calibration["precision"], flavor)
        data["calibrations"] = [c for c in data.get("calibrations") or [] if c["classes"]]
    elif manifest.memory_files():
        data["calibrations"] = _served_calibration(manifest, precision)
    return Manifest.from_dict(data, "served manifest")


def _served_calibration(manifest: Manifest, precision: str) -> list[dict]:
    """With few-shot memories, the python flavor carries only the calibration its server picks (ONNX Runtime on
    the CPU, the precision's CPU file when there is one), so the client decides fused outputs with fused thresholds
    and zero-shot outputs with zero-shot ones; memory classes of another precision's calibration are left out (the
    server runs them without the memory)."""
    wanted = precisions.get(precision)
    running = wanted.cpu_substitute if wanted.cpu_substitute and \
        precisions.get(wanted.cpu_substitute).file in manifest.files else wanted.name
    cal, _ = manifest.calibration(running, "onnxruntime")
    if cal is None:
        return []
    data = schema.dump(cal)
    if cal.precision != running:
        data["classes"] = {n: c for n, c in data["classes"].items() if not c.get("memory")}
    return [data] if data["classes"] else []


def _write_model(model_dir, manifest, served, target, folder, flavor, precision, engine, model_batch, instances,
                 delay_us, common) -> str:
    version = os.path.join(target, "1")
    if flavor == "python":
        for file in served.files:
            shutil.copyfile(manifest.verify_file(model_dir, file), os.path.join(version, file))
        for file in served.memory_files():   # checked against their sha256 when the served model loads them
            shutil.copyfile(os.path.join(model_dir, file), os.path.join(version, file))
        served.write(version)
        _write_shim(target, "OnnxModel")
        head = f'name: {pbtxt_string(folder)}\nbackend: "python"\n'
        group = f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n"
    elif flavor == "onnxruntime":
        file = precisions.get(precision).file
        if file not in manifest.files:
            raise ClipadError(f"{model_dir}: no {file} to serve; add it with export-engine --from-onnx {model_dir} "
                              f"--precision {precision}")
        shutil.copyfile(manifest.verify_file(model_dir, file), os.path.join(version, "model.onnx"))
        head = f'name: {pbtxt_string(folder)}\nplatform: "onnxruntime_onnx"\n'
        group = f"instance_group [ {{ count: {instances} kind: KIND_AUTO }} ]\n"
    else:
        entry = _engine(manifest, precision, engine)
        shutil.copyfile(_verified_engine(model_dir, entry), os.path.join(version, "model.plan"))
        head = f'name: {pbtxt_string(folder)}\nplatform: "tensorrt_plan"\n'
        group = f"instance_group [ {{ count: {instances} kind: KIND_GPU }} ]\n"
    s, k = manifest.image_size, len(manifest.class_names)
    outputs = [tensor("anomaly_map", "TYPE_FP32", [k, s, s]), tensor("image_score", "TYPE_FP32", [k])]
    features = features_spec(manifest)
    if features is not None and flavor != "python":   # the file or engine has it, and Triton wants every output
        outputs.append(tensor(features.name, "TYPE_FP32", [int(d) for d in features.shape[1:]]))
    return (head + f"max_batch_size: {model_batch}\n"
            + tensors("input", [tensor(manifest.input.name, "TYPE_UINT8", [s, s, 3])])
            + tensors("output", outputs)
            + f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n" + group + parameters(common))


def _accelerator(name: str, precision: str) -> str:
    if name == "tensorrt":
        mode = "FP16" if precisions.get(precision).conversion == "float16" else "FP32"
        return ('optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt" '
                f'parameters {{ key: "precision_mode" value: "{mode}" }} }} ] }} }}\n')
    if name == "openvino":
        return 'optimization { execution_accelerators { cpu_execution_accelerator: [ { name: "openvino" } ] } }\n'
    return ""


def _python_config(folder, role, manifest, model_batch, instances, delay_us, common) -> str:
    s, k = manifest.image_size, len(manifest.class_names)
    if role == "pre":
        io = (tensors("input", [tensor("IMAGE", "TYPE_STRING", [1])])
              + tensors("output", [tensor("images", "TYPE_UINT8", [s, s, 3])]))
    else:
        io = (tensors("input", [tensor("anomaly_map", "TYPE_FP32", [k, s, s]), tensor("image_score", "TYPE_FP32", [k])])
              + tensors("output", [tensor(n, "TYPE_STRING" if n == "label" else "TYPE_FP32", [k])
                                   for n in POST_OUTPUTS]))
    return (f'name: {pbtxt_string(folder)}\nbackend: "python"\nmax_batch_size: {model_batch}\n' + io
            + f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n"
            + f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n" + parameters(common))


def _pipeline_config(folder, names, manifest, model_batch) -> str:
    s, k = manifest.image_size, len(manifest.class_names)
    outputs = [tensor("anomaly_map", "TYPE_FP32", [k, s, s]), tensor("image_score", "TYPE_FP32", [k])] + [
        tensor(n, "TYPE_STRING" if n == "label" else "TYPE_FP32", [k]) for n in POST_OUTPUTS]

    def step(model, inputs, outputs_):
        ins = " ".join(f"input_map {{ key: {pbtxt_string(a)} value: {pbtxt_string(b)} }}" for a, b in inputs)
        outs = " ".join(f"output_map {{ key: {pbtxt_string(a)} value: {pbtxt_string(b)} }}" for a, b in outputs_)
        return f"    {{ model_name: {pbtxt_string(model)} model_version: -1 {ins} {outs} }}"

    steps = [step(names["pre"], [("IMAGE", "IMAGE")], [("images", "_images")]),
             step(names["model"], [(manifest.input.name, "_images")],
                  [("anomaly_map", "anomaly_map"), ("image_score", "image_score")]),
             step(names["post"], [("anomaly_map", "anomaly_map"), ("image_score", "image_score")],
                  [(n, n) for n in POST_OUTPUTS])]
    return (f'name: {pbtxt_string(folder)}\nplatform: "ensemble"\nmax_batch_size: {model_batch}\n'
            + tensors("input", [tensor("IMAGE", "TYPE_STRING", [1])]) + tensors("output", outputs)
            + "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n"
            + parameters({"clipad_pipeline": names["model"]}))


def _write_shim(target: str, cls: str) -> None:
    with open(os.path.join(target, "1", "model.py"), "w") as fh:
        fh.write(SHIM_HEADER + SHIM.format(cls=cls))
