"""Few-shot memories at run time: normal patch features stored beside the model (``edge-calibrate --memory``) and
the few-shot graph (``fewshot.onnx``, see ``clipad.export.fewshot_graph``) that compares an image's patch features
with them and fuses the result with the zero-shot outputs.

A memory is FP16 ``memory-<sha256 prefix>-<run>.npy`` [T, M, C] (taps, rows, channels), one file per calibration
run (so no two runs share, overwrite or delete each other's file), loaded with ``allow_pickle=False`` after its
sha256 is checked. It belongs to one precision's model file: a re-export changes that file's sha256, and the memory
is refused as stale.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import secrets

import numpy as np

from . import precisions
from .atomic import write_atomic
from .errors import ClipadError
from .manifest import Manifest, sha256_file

log = logging.getLogger("clipad")
GRAPH_FILE = "fewshot.onnx"
FEATURES = "patch_features"
GRAPH_INPUTS = ("patch_features", "memory", "anomaly_map", "image_score")
GRAPH_OUTPUTS = ("fewshot_map", "fused_map", "fused_score")


def features_spec(manifest: Manifest):
    """The manifest's patch_features output, or None (exported without --memory-features)."""
    return next((o for o in manifest.outputs if o.name == FEATURES), None)


def require_features(manifest: Manifest, model_dir: str) -> tuple[int, int, int]:
    """(taps, patches, channels) of an export that can hold a memory; else a one-line error saying how to get one."""
    spec = features_spec(manifest)
    if spec is None or GRAPH_FILE not in manifest.files:
        raise ClipadError(f"{model_dir}: exported without --memory-features, so it has no patch features for a "
                          f"few-shot memory; re-export with export-engine … --memory-features")
    _, taps, patches, channels = spec.shape
    return int(taps), int(patches), int(channels)


def model_file_of(precision: str) -> str:
    """The ONNX file whose outputs a memory of this precision was made from (its sha256 makes the memory stale)."""
    return precisions.get(precision).file


def as_loaded(bank: np.ndarray) -> np.ndarray:
    """The FP16 bank as the graph gets it: float32 rows scaled back to unit length, so a patch that is in the memory
    has a cosine of 1 up to float32 rounding (FP16 storage alone leaves 1e-4 at narrow widths; renormalised, the
    error is second order)."""
    bank = np.asarray(bank, np.float16).astype(np.float32)
    norms = np.linalg.norm(bank, axis=-1, keepdims=True)
    return bank / np.maximum(norms, np.float32(1e-12))


def save_memory(model_dir: str, bank: np.ndarray) -> tuple[str, str]:
    """Write an FP16 [T, M, C] bank atomically as ``memory-<sha>.npy``; (file name, sha256)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(bank, dtype=np.float16), allow_pickle=False)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    name = f"memory-{digest[:16]}-{secrets.token_hex(4)}.npy"   # one file per calibration run: nothing shares it
    write_atomic(os.path.join(model_dir, name), lambda fh: fh.write(data), durable=True)
    return name, digest


def load_memory(model_dir: str, manifest: Manifest, record: dict, precision: str, where: str) -> np.ndarray:
    """The memory of one class calibration as float32 [T, M, C], after every check: file, sha256, shape, dtype,
    finite values, and made from the model file this precision runs now (else stale)."""
    path = os.path.join(model_dir, record["file"])
    wanted = model_file_of(precision)
    if record["model_file"] != wanted:
        raise ClipadError(f"{where}: its few-shot memory was made with {record['model_file']}, but {precision} runs "
                          f"{wanted}; run edge-calibrate --memory … --precision {precision}")
    entry = manifest.files.get(record["model_file"])
    if entry is None or entry.sha256 != record["model_sha256"]:
        raise ClipadError(f"{where}: its few-shot memory is stale: it was made from {record['model_file']} sha256 "
                          f"{record['model_sha256'][:12]}…, which is now "
                          f"{entry.sha256[:12] + '…' if entry else 'gone'} (re-exported); run edge-calibrate --memory "
                          f"again")
    if not os.path.isfile(path):
        raise ClipadError(f"{path}: the few-shot memory named in the manifest is missing; run edge-calibrate --memory")
    if sha256_file(path) != record["sha256"]:
        raise ClipadError(f"{path}: sha256 does not match the manifest (file changed or truncated); run "
                          f"edge-calibrate --memory again")
    try:
        bank = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ClipadError(f"{path}: not a readable .npy memory ({str(exc)[:120]})") from None
    shape = (record["taps"], record["rows"], record["channels"])
    if bank.dtype != np.float16 or bank.shape != shape:
        raise ClipadError(f"{path}: {bank.dtype} {list(bank.shape)}, expected float16 {list(shape)}")
    if not np.isfinite(bank).all():
        raise ClipadError(f"{path}: the memory holds non-finite values")
    return as_loaded(bank)


def open_graph(model_dir: str, manifest: Manifest, backend: str, threads: int | None = None, cpu_only: bool = False):
    """The few-shot graph beside the backend that runs the model, as its registry record says (OpenVINO next to
    OpenVINO; ONNX Runtime, with CUDA when the installed one has it, next to the others: no TensorRT engine of the
    graph yet)."""
    from .backends.registry import get

    runner = GRAPH_RUNNERS[get(backend).fewshot]
    return runner(model_dir, manifest, threads, cpu_only) if runner is FewShotGraph else runner(model_dir, manifest,
                                                                                                 threads)


class OpenVINOFewShotGraph:
    """``fewshot.onnx`` compiled by OpenVINO for the CPU in FP32 (its BF16 default on BF16 CPUs would round the
    cosines)."""

    def __init__(self, model_dir: str, manifest: Manifest, threads: int | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise ClipadError("OpenVINO is not installed (pip install 'clipad-edge[openvino]')") from None
        path = manifest.verify_file(model_dir, GRAPH_FILE)
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = ov.Core().compile_model(path, "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long texts
            raise ClipadError(f"{path}: OpenVINO cannot compile the few-shot graph "
                              f"({str(exc).strip().splitlines()[0][:200]})") from None
        self.request = self.compiled.create_infer_request()

    def run(self, features: np.ndarray, memory: np.ndarray, anomaly_map: np.ndarray, image_score: np.ndarray):
        feed = dict(zip(GRAPH_INPUTS, (np.ascontiguousarray(features, np.float32), memory,
                                       np.ascontiguousarray(anomaly_map, np.float32),
                                       np.ascontiguousarray(image_score, np.float32))))
        results = self.request.infer(feed)
        return tuple(np.array(results[self.compiled.output(name)], np.float32, copy=True) for name in GRAPH_OUTPUTS)


class FewShotGraph:
    """``fewshot.onnx`` on ONNX Runtime (CPU, or CUDA when the installed ONNX Runtime has it)."""

    def __init__(self, model_dir: str, manifest: Manifest, threads: int | None = None, cpu_only: bool = False):
        from .backends.onnxruntime import _ort

        ort = _ort()
        path = manifest.verify_file(model_dir, GRAPH_FILE)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        wanted = ("CPUExecutionProvider",) if cpu_only else ("CUDAExecutionProvider", "CPUExecutionProvider")
        providers = [p for p in wanted if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(path, opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ClipadError(f"{path}: ONNX Runtime cannot load the few-shot graph "
                              f"({str(exc).splitlines()[0][:200]})") from None
        names = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        if names != (list(GRAPH_INPUTS), list(GRAPH_OUTPUTS)):
            raise ClipadError(f"{path}: inputs/outputs {names} are not the few-shot graph's; re-export")

    def run(self, features: np.ndarray, memory: np.ndarray, anomaly_map: np.ndarray, image_score: np.ndarray):
        """features [N, T, P, C], memory [T, M, C], one class's anomaly_map [N, S, S] and image_score [N] →
        (fewshot_map [N, S, S], fused_map [N, S, S], fused_score [N])."""
        feed = {"patch_features": np.ascontiguousarray(features, np.float32), "memory": memory,
                "anomaly_map": np.ascontiguousarray(anomaly_map, np.float32),
                "image_score": np.ascontiguousarray(image_score, np.float32)}
        return tuple(self.session.run(list(GRAPH_OUTPUTS), feed))


class FewShot:
    """The memories of one precision × backend calibration, per class, with the graph that applies them."""

    def __init__(self, graph: FewShotGraph, memories: dict[str, np.ndarray]):
        self.graph, self.memories = graph, memories

    @classmethod
    def open(cls, model_dir: str | None, manifest: Manifest, calibration, precision: str, backend: str = "onnxruntime",
             threads: int | None = None, cpu_only: bool = False) -> "FewShot | None":
        """None when no class of ``calibration`` has a memory."""
        records = {name: cal.memory for name, cal in (calibration.classes.items() if calibration else [])
                   if cal.memory is not None}
        if not records or model_dir is None:   # remote (Triton): its python flavor fuses on the server
            return None
        require_features(manifest, model_dir)
        if calibration.precision != precision:
            raise ClipadError(f"{model_dir}: the {calibration.precision} calibration has a few-shot memory, which "
                              f"fits {calibration.precision} features only; run edge-calibrate --memory … "
                              f"--precision {precision}")
        loaded: dict[str, np.ndarray] = {}   # classes calibrated in one run share one memory file: loaded once
        memories = {}
        for name, record in records.items():
            if record["sha256"] not in loaded:
                loaded[record["sha256"]] = load_memory(model_dir, manifest, record, precision,
                                                       f"{model_dir} class {name!r}")
            memories[name] = loaded[record["sha256"]]
        return cls(open_graph(model_dir, manifest, backend, threads, cpu_only), memories)

    def apply(self, class_names: list[str], maps: np.ndarray, scores: np.ndarray, features: np.ndarray,
              classes: set[int] | None = None, chunk: int = 4):
        """Fuse in place for the classes with a memory (of ``classes`` when given), ``chunk`` images per graph run
        (its similarities grow with the batch); returns {class index: fewshot_map [N, S, S]}."""
        fewshot = {}
        for k, name in enumerate(class_names):
            memory = self.memories.get(name)
            if memory is None or (classes is not None and k not in classes):
                continue
            parts = [self.graph.run(features[i:i + chunk], memory, maps[i:i + chunk, k], scores[i:i + chunk, k])
                     for i in range(0, len(features), chunk)]
            fewshot[k] = np.concatenate([p[0] for p in parts])
            maps[:, k] = np.concatenate([p[1] for p in parts])
            scores[:, k] = np.concatenate([p[2] for p in parts])
        return fewshot


GRAPH_RUNNERS = {"onnxruntime": FewShotGraph, "openvino": OpenVINOFewShotGraph}
