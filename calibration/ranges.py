"""INT8 activation ranges, collected one batch at a time.

onnxruntime's own calibrators keep every intermediate tensor of every calibration batch until the end (MinMax grew
≈2.5 GB per image on ViT-L-14-336@518 and was OOM-killed at 24 GB). Here the FP32 model gets the tensors to calibrate
as extra outputs, each batch's tensors are folded into a running range (MinMax) or onnxruntime's own
``HistogramCollector`` (entropy, percentile) and dropped, so memory stays at one batch. The result is onnxruntime's
``TensorsData``, which ``quantize_static`` takes through its calibration cache file.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Iterable

import numpy as np

log = logging.getLogger("clipad")
FLOAT_TYPES = (1, 10)  # onnx.TensorProto.FLOAT, FLOAT16
# onnxruntime's create_calibrator defaults, so a one-batch calibration gives exactly its ranges.
HISTOGRAM_DEFAULTS = {"entropy": {"num_bins": 128, "num_quantized_bins": 128, "percentile": 99.999},
                      "percentile": {"num_bins": 2048, "num_quantized_bins": 128, "percentile": 99.999}}


def constant_names(model) -> set[str]:
    """Initializers and Constant-node outputs: the tensors that are weights, not activations."""
    return {i.name for i in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output}


def activation_tensors(model, node_names: Iterable[str]) -> list[str]:
    """The float activations (non-constant inputs and outputs) of the named nodes, in graph order."""
    wanted = set(node_names)
    consts = constant_names(model)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    seen, names = set(), []
    for node in model.graph.node:
        if node.name not in wanted:
            continue
        for t in [*node.input, *node.output]:
            if t and t not in consts and t not in seen and types.get(t, 1) in FLOAT_TYPES:
                seen.add(t)
                names.append(t)
    return names


def augmented_model(model_path: str, tensors: list[str], dst: str) -> None:
    """Copy of the model whose outputs are only ``tensors`` (the original outputs are not needed)."""
    import onnx

    model = onnx.load(model_path)
    infos = {vi.name: vi for vi in [*model.graph.value_info, *model.graph.output]}
    del model.graph.output[:]
    for t in tensors:
        model.graph.output.append(infos.get(t) or onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    onnx.save(model, dst)


class RangeCollector:
    """Running symmetric ranges (minmax) or onnxruntime histograms (entropy, percentile) over batches."""

    def __init__(self, method: str):
        from onnxruntime.quantization.calibrate import HistogramCollector

        self.method, self.absmax, self.histograms = method, {}, None
        if method != "minmax":
            opts = HISTOGRAM_DEFAULTS[method]
            self.histograms = HistogramCollector(method=method, symmetric=True, scenario="same", **opts)

    def add(self, named: dict[str, np.ndarray]) -> None:
        if self.histograms is not None:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per call
                self.histograms.collect({k: [v] for k, v in named.items()})
            return
        for name, value in named.items():
            m = np.float32(np.nanmax(np.abs(value))) if value.size else np.float32(0)
            self.absmax[name] = max(self.absmax.get(name, m), m)

    def result(self):
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

        if self.histograms is not None:
            method = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[self.method]
            with contextlib.redirect_stdout(io.StringIO()):
                return TensorsData(method, self.histograms.compute_collection_result())
        return TensorsData(CalibrationMethod.MinMax,
                           {k: (np.array(-m, np.float32), np.array(m, np.float32)) for k, m in self.absmax.items()})


def _outputs(model_path: str, tensors: list[str], batches: Iterable[dict], desc: str, total: int | None,
             optimize: bool):
    """Each batch's values of ``tensors`` (the FP32 model with them as its only outputs), one batch at a time."""
    import onnxruntime as ort
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="clipad-calib-") as tmp:
        path = os.path.join(tmp, "augmented.onnx")
        augmented_model(model_path, tensors, path)
        opts = ort.SessionOptions()
        opts.enable_cpu_mem_arena = False  # outputs are fresh each batch; an arena only grows
        if not optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        for feed in tqdm(batches, total=total, desc=desc, unit="batch", leave=False):
            yield dict(zip(tensors, sess.run(tensors, feed)))
        del sess


def collect_ranges(model_path: str, tensors: list[str], batches: Iterable[dict], method: str, total: int | None = None,
                   optimize: bool = True):
    """Run the FP32 model over ``batches`` (input feeds) and return onnxruntime ``TensorsData`` for ``tensors``.

    ``optimize=False`` runs the graph unfused, as onnxruntime's calibrators do; the default runs onnxruntime's fused
    kernels, which round some activations differently in the last bit."""
    collector = RangeCollector(method)
    for named in _outputs(model_path, tensors, batches, f"INT8 calibration ({method})", total, optimize):
        collector.add(named)
    return collector.result()


def collect_channel_extrema(model_path: str, tensors: list[str], batches: Iterable[dict], total: int | None = None,
                            optimize: bool = True) -> dict[str, np.ndarray]:
    """[min, max] per channel (the last axis) of each of ``tensors`` over ``batches``, as a (2, channels) array: what
    SmoothQuant balances and what a shift centres."""
    extrema: dict[str, np.ndarray] = {}
    for named in _outputs(model_path, tensors, batches, "INT8 channel ranges", total, optimize):
        for name, value in named.items():
            flat = value.reshape(-1, value.shape[-1])
            m = np.stack([np.nanmin(flat, axis=0), np.nanmax(flat, axis=0)]).astype(np.float32)
            if name in extrema:
                m = np.stack([np.minimum(extrema[name][0], m[0]), np.maximum(extrema[name][1], m[1])])
            extrema[name] = m
    return extrema
