"""SmoothQuant (Xiao et al., ICML 2023) as an ONNX graph transform, for the static INT8 Q/DQ file.

The Q/DQ file quantizes each linear layer's input with one scale per tensor, fixed at calibration. CLIP's LayerNorm
outputs carry a few channels far larger than the rest, so that one scale leaves most channels a handful of INT8
steps; the dynamic ``int8-cpu`` file, which picks its scale per image, kept AA-CLIP's decisions where the static one
flipped one of 20. SmoothQuant divides channel j of the LayerNorm output by s_j = max|X_j|^α / max|W_j|^(1-α) and
multiplies row j of the following weights by s_j: the product is unchanged, the activation's channels are evened
out, and the weights, quantized per output channel, take part of the range. The division folds into the LayerNorm's
γ and β, so the graph gains no node and TensorRT still sees symmetric per-tensor activation Q/DQ.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from clipad.runtime.errors import ClipadError

log = logging.getLogger("clipad")
TOOL = "clipad.export.smoothquant (scales folded into LayerNorm γ/β and the following weights' rows)"


def _initializers(model) -> dict:
    return {i.name: i for i in model.graph.initializer}


def smoothable(model) -> dict[str, tuple]:
    """LayerNorm outputs whose every consumer is a MatMul taking it as A against a constant 2-D weight B
    ([channels, out]), with γ and β constant: {LayerNorm output: (LayerNorm node, [MatMul nodes])}."""
    inits = _initializers(model)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    found = {}
    for node in model.graph.node:
        if node.op_type != "LayerNormalization" or len(node.input) < 3 or node.output[0] in outputs:
            continue
        if not all(name in inits for name in node.input[1:3]):
            continue
        users = consumers.get(node.output[0], [])
        if users and all(u.op_type == "MatMul" and u.input[0] == node.output[0] and u.input[1] in inits
                         and len(inits[u.input[1]].dims) == 2 for u in users):
            found[node.output[0]] = (node, users)
    return found


def scales(act_absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s_j = max|X_j|^α / max|W_j|^(1-α) over all weights reading X; 1 where a channel is all zero."""
    w = np.max([np.abs(x).max(axis=1) for x in weights], axis=0).astype(np.float64)
    a = act_absmax.astype(np.float64)
    s = np.ones_like(a)
    ok = (a > 0) & (w > 0) & np.isfinite(a)
    s[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return np.clip(s, 1e-5, 1e5).astype(np.float32)


def _replace(model, node, index: int, value: np.ndarray, uses: dict[str, int]) -> None:
    """Give ``node`` input ``index`` the constant ``value``: in place when only this node reads it, else as a new
    initializer (a weight shared with another node keeps its value there)."""
    from onnx import numpy_helper

    name = node.input[index]
    inits = _initializers(model)
    if uses.get(name, 0) == 1:
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
        return
    new = f"{name}_smoothed_{node.name}"
    model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), new))
    uses[name] -= 1
    node.input[index] = new


def smooth(model, act_absmax: dict[str, np.ndarray], alpha: float) -> dict[str, np.ndarray]:
    """Fold SmoothQuant's scales into ``model`` (in place, FP32); returns each smoothed tensor's scales."""
    from onnx import numpy_helper

    if not 0.0 < alpha < 1.0:
        raise ClipadError(f"--int8-smoothquant {alpha:g}: α must lie between 0 and 1 (0.5 is SmoothQuant's default)")
    inits = _initializers(model)
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    done = {}
    for tensor, (ln, matmuls) in smoothable(model).items():
        if tensor not in act_absmax:
            continue
        weights = [numpy_helper.to_array(inits[m.input[1]]) for m in matmuls]
        s = scales(act_absmax[tensor], weights, alpha)
        for index in (1, 2):
            _replace(model, ln, index, numpy_helper.to_array(_initializers(model)[ln.input[index]]) / s, uses)
        for m, w in zip(matmuls, weights):
            _replace(model, m, 1, w * s[:, None], uses)
        done[tensor] = s
    return done


def smoothed_copy(src: str, work_dir: str, alpha: float, act_absmax: dict[str, np.ndarray]) -> tuple[str, dict, int]:
    """Write the smoothed FP32 model into ``work_dir``; returns its path, the scales per smoothed tensor and how many
    linear layers read a smoothed tensor."""
    import onnx

    model = onnx.load(src)
    readers = sum(len(users) for tensor, (_, users) in smoothable(model).items() if tensor in act_absmax)
    done = smooth(model, act_absmax, alpha)
    if not done:
        raise ClipadError("--int8-smoothquant: this model has no LayerNorm feeding linear layers to smooth")
    path = os.path.join(work_dir, "model.smoothed.onnx")
    onnx.save(model, path)
    return path, done, readers


def derived_ranges(channel_absmax: dict[str, np.ndarray], smoothed: dict[str, np.ndarray]):
    """Min-max ranges of the smoothed model from the FP32 model's per-channel maxima: a smoothed tensor's channel j
    is X_j / s_j, every other calibrated tensor is unchanged, so one calibration pass serves both."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

    out = {}
    for name, absmax in channel_absmax.items():
        m = np.float32(np.max(absmax / smoothed[name]) if name in smoothed else np.max(absmax))
        out[name] = (np.array(-m, np.float32), np.array(m, np.float32))
    return TensorsData(CalibrationMethod.MinMax, out)


def summary(alpha: float, smoothed: dict[str, np.ndarray], linear_layers: int) -> dict:
    every = np.concatenate(list(smoothed.values()))
    return {"alpha": alpha, "layer_norms": len(smoothed), "linear_layers": linear_layers,
            "scale_min": float(every.min()), "scale_max": float(every.max()), "tool": TOOL}


def channel_absmax(src: str, calib: np.ndarray, batch: int, tensors: list[str], input_name: str,
                   cache_dir: str | None) -> dict[str, np.ndarray]:
    """Per-channel activation maxima of ``tensors`` over the calibration images (cached like the ranges)."""
    from clipad.calibration.ranges import collect_channel_absmax

    from .convert import _batches, _ranges_key

    cache = os.path.join(cache_dir, f"channels-{_ranges_key(src, calib, 'channels', batch)}.npz") if cache_dir else None
    if cache and os.path.isfile(cache):
        try:
            with np.load(cache) as z:
                if set(tensors) <= set(z.files):
                    log.info("      channel ranges from cache %s", cache)
                    return {t: z[t] for t in tensors}
        except (ValueError, OSError, KeyError):
            pass  # unreadable cache: collect again and overwrite it
    absmax = collect_channel_absmax(src, tensors, _batches(input_name, calib, batch), total=-(-len(calib) // batch))
    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **absmax)
        os.replace(tmp, cache)
    return absmax


def smoothed(src: str, work_dir: str, calib: np.ndarray, batch: int, alpha: float, cache_dir: str | None,
             derive_ranges: bool):
    """SmoothQuant's FP32 model in ``work_dir`` (see above). With ``derive_ranges`` (min-max ranges for
    quantize_static) one pass over the calibration images collects every linear layer's input per channel, and the
    smoothed model's ranges follow from it; otherwise only the smoothed tensors are collected and the smoothed model
    is calibrated as usual. Returns (path, nodes, tensors, ranges or None, manifest summary)."""
    import onnx

    from clipad.calibration.ranges import activation_tensors

    from .convert import linear_nodes

    graph = onnx.load(src, load_external_data=False)
    nodes = linear_nodes(graph)
    quantizable = set(nodes)
    targets = [t for t, (_, users) in smoothable(graph).items()
               if all(u.name in quantizable for u in users)]
    tensors = activation_tensors(graph, nodes)
    input_name = graph.graph.input[0].name
    del graph
    absmax = channel_absmax(src, calib, batch, tensors if derive_ranges else targets, input_name, cache_dir)
    path, scales, readers = smoothed_copy(src, work_dir, alpha, {t: absmax[t] for t in targets})
    ranges = derived_ranges(absmax, scales) if derive_ranges else None
    log.info("      SmoothQuant α %g: %d LayerNorm outputs into %d linear layers, scales %.3g … %.3g", alpha,
             len(scales), readers, *(f(np.concatenate(list(scales.values()))) for f in (np.min, np.max)))
    return path, nodes, tensors, ranges, summary(alpha, scales, readers)
