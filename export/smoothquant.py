"""SmoothQuant (Xiao et al., ICML 2023) and a centring shift (Outlier Suppression+, Wei et al., EMNLP 2023) as
ONNX graph transforms, for the static INT8 Q/DQ file.

The Q/DQ file quantizes each linear layer's input with one scale per tensor, fixed at calibration. CLIP's LayerNorm
outputs carry a few channels far larger than the rest, so that one scale leaves most channels a handful of INT8
steps; the dynamic ``int8-cpu`` file, which picks its scale per image, kept AA-CLIP's decisions where the static one
flipped one of 20. SmoothQuant divides channel j of the LayerNorm output by s_j = max|X_j|^α / max|W_j|^(1-α) and
multiplies row j of the following weights by s_j: the product is unchanged, the activation's channels are evened
out, and the weights, quantized per output channel, take part of the range. The division folds into the LayerNorm's
γ and β, so the graph gains no node and TensorRT still sees symmetric per-tensor activation Q/DQ.

TensorRT takes only symmetric INT8, and a GELU output spans −0.17 … 5: the codes below −0.17 go unused, about one bit
of the eight (the dynamic file's unsigned, asymmetric INT8 keeps it). The shift subtracts the calibrated range's
midpoint z from such an input (one Sub node) and adds z · Σ_rows W to the layer's bias, so the FP32 product is
unchanged and the symmetric range covers what occurs. Once the weights are quantized, the bias takes z · Σ_rows Ŵ
(the dequantized weights) instead (``requantized_bias``): otherwise the weights' rounding error would meet the
shifted input, now ≈ z everywhere instead of mostly ≈ 0, and grow with it.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from clipad.runtime.errors import ClipadError

log = logging.getLogger("clipad")
TOOL = "clipad.export.smoothquant (scales folded into LayerNorm γ/β and the following weights' rows)"
SHIFT_TOOL = ("clipad.export.smoothquant (input − z before the layer, z · Σ_rows Ŵ of the quantized weights added to "
              "its bias)")
SHIFTED = "_centred"
LOPSIDED = 0.75   # shift when the calibrated span uses less than this share of the symmetric range


def _initializers(model) -> dict:
    return {i.name: i for i in model.graph.initializer}


def _readers(model) -> tuple[dict[str, list], set[str]]:
    """{tensor: the nodes that read it}, and the graph's output names."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers, {o.name for o in model.graph.output}


def smoothable(model) -> dict[str, tuple]:
    """LayerNorm outputs whose every consumer is a MatMul taking it as A against a constant 2-D weight B
    ([channels, out]), with γ and β constant: {LayerNorm output: (LayerNorm node, [MatMul nodes])}."""
    inits = _initializers(model)
    consumers, outputs = _readers(model)
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
    new = f"{name}_for_{node.name}"
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


def summary(alpha: float, smoothed: dict[str, np.ndarray], linear_layers: int) -> dict:
    every = np.concatenate(list(smoothed.values())) if smoothed else None
    return {"alpha": alpha, "layer_norms": len(smoothed), "linear_layers": linear_layers,
            "scale_min": None if every is None else float(every.min()),
            "scale_max": None if every is None else float(every.max()), "tool": TOOL}


def shiftable(model, nodes: set[str]) -> dict[str, list[tuple]]:
    """Activations whose every consumer is a MatMul of ``nodes`` (constant 2-D weight) whose output goes only to an
    Add with a constant bias: {tensor: [(MatMul, Add, bias input index)]}."""
    inits = _initializers(model)
    consumers, outputs = _readers(model)
    found: dict[str, list[tuple]] = {}
    for node in model.graph.node:
        if node.name not in nodes or node.op_type != "MatMul" or node.input[1] not in inits \
                or len(inits[node.input[1]].dims) != 2 or node.input[0] in inits:
            continue
        after = consumers.get(node.output[0], [])
        if len(after) != 1 or after[0].op_type != "Add" or node.output[0] in outputs:
            continue
        bias = [i for i, name in enumerate(after[0].input) if name in inits]
        if len(bias) == 1 and list(inits[after[0].input[bias[0]]].dims) == [inits[node.input[1]].dims[1]]:
            found.setdefault(node.input[0], []).append((node, after[0], bias[0]))
    return {t: users for t, users in found.items() if len(users) == len(consumers.get(t, [])) and t not in outputs}


def lopsided(lo: float, hi: float) -> bool:
    span = max(-lo, hi)
    return span > 0 and (hi - lo) < LOPSIDED * 2 * span


def shift(model, extrema: dict[str, np.ndarray], candidates: dict[str, list[tuple]],
          centred: dict[str, tuple] | None = None) -> dict[str, float]:
    """Centre each lopsided candidate (in place, FP32): returns {tensor: z}; ``centred`` receives, per MatMul, what
    ``requantized_bias`` needs (bias Add name, bias input, z, Σ_rows W)."""
    from onnx import helper, numpy_helper

    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    inits = _initializers(model)
    done, before = {}, {}
    for tensor, users in candidates.items():
        if tensor not in extrema:
            continue
        lo, hi = float(extrema[tensor][0].min()), float(extrema[tensor][1].max())
        if not lopsided(lo, hi):
            continue
        z = np.float32((lo + hi) / 2)
        model.graph.initializer.append(numpy_helper.from_array(np.array(z, np.float32), f"{tensor}_shift"))
        before[users[0][0].name] = helper.make_node("Sub", [tensor, f"{tensor}_shift"], [tensor + SHIFTED],
                                                    name=f"centre_{tensor}")
        for matmul, add, index in users:
            w = numpy_helper.to_array(inits[matmul.input[1]])
            b = numpy_helper.to_array(_initializers(model)[add.input[index]])
            _replace(model, add, index, b + z * w.astype(np.float64).sum(axis=0), uses)
            matmul.input[0] = tensor + SHIFTED
            if centred is not None:
                centred[matmul.name] = (add.name, index, float(z), w.astype(np.float64).sum(axis=0))
        done[tensor] = float(z)
    if before:
        ordered = []
        for node in model.graph.node:
            if node.name in before:
                ordered.append(before[node.name])
            ordered.append(node)
        del model.graph.node[:]
        model.graph.node.extend(ordered)
    return done


def requantized_bias(model, centred: dict[str, tuple]) -> int:
    """In the quantized ``model`` (in place): each centred layer's bias takes z · Σ_rows Ŵ, the dequantized weights
    its DequantizeLinear feeds the MatMul, in place of z · Σ_rows W. Returns how many biases changed."""
    from onnx import numpy_helper

    inits = _initializers(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    by_name = {n.name: n for n in model.graph.node}
    changed = 0
    for name, (add_name, index, z, colsum) in centred.items():
        matmul, dq = by_name.get(name), None
        if matmul is not None:
            dq = producers.get(matmul.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or not all(i in inits for i in dq.input):
            continue   # the layer stayed float: its exact compensation holds
        q, scale, *zp = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in dq.input)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        if scale.ndim:
            shape[axis] = -1
        w_hat = (q - (zp[0].reshape(shape) if zp else 0)) * scale.reshape(shape)
        add = by_name[add_name]
        bias = numpy_helper.to_array(inits[add.input[index]]).astype(np.float64)
        inits[add.input[index]].CopyFrom(numpy_helper.from_array(
            (bias + z * (w_hat.sum(axis=0) - colsum)).astype(np.float32), add.input[index]))
        changed += 1
    return changed


def channel_extrema(src: str, tensors: list[str], batches, total: int, cache: str | None) -> dict[str, np.ndarray]:
    """Per-channel [min, max] of ``tensors`` over ``batches()`` (input feeds), kept in the ``cache`` file (.npz)."""
    from clipad.calibration.ranges import collect_channel_extrema

    if cache and os.path.isfile(cache):
        try:
            with np.load(cache) as z:
                if set(tensors) <= set(z.files):
                    log.info("      channel ranges from cache %s", cache)
                    return {t: z[t] for t in tensors}
        except (ValueError, OSError, KeyError):
            pass  # unreadable cache: collect again and overwrite it
    extrema = collect_channel_extrema(src, tensors, batches(), total=total)
    if cache:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **extrema)
        os.replace(tmp, cache)
    return extrema


def derived_ranges(tensors: list[str], extrema: dict[str, np.ndarray], scales: dict[str, np.ndarray],
                   shifts: dict[str, float]):
    """Min-max ranges of the transformed model from the FP32 model's per-channel extrema: a smoothed tensor's channel
    j is X_j / s_j, a centred one X − z, every other calibrated tensor is unchanged (``transformed`` moves the
    per-channel extrema of a centred layer's product before its bias by z · Σ_rows W), so one pass serves both."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

    out = {}
    for name in tensors:
        source = name[:-len(SHIFTED)] if name.endswith(SHIFTED) and name[:-len(SHIFTED)] in shifts else name
        lo, hi = extrema[source]
        absmax = np.maximum(-lo, hi)
        if source in scales:
            m = np.max(absmax / scales[source])
        elif source in shifts:
            m = max(hi.max() - shifts[source], shifts[source] - lo.min())
        else:
            m = np.max(absmax)
        out[name] = (np.array(-m, np.float32), np.array(m, np.float32))
    return TensorsData(CalibrationMethod.MinMax, out)


def transformed(src: str, work_dir: str, nodes: list[str], batches, total: int, cache: str | None,
                alpha: float | None, centre: bool, derive_ranges: bool, kept: set[str] = frozenset()):
    """The FP32 model with SmoothQuant (``alpha``) and/or the centring shift (``centre``) in ``work_dir``, for the
    linear layers that will be quantized (not those in ``kept``, which stay float and gain nothing from it). With
    ``derive_ranges`` (min-max ranges for quantize_static) one pass over the calibration images collects every
    linear layer's activations per channel, and the new model's ranges follow from it; otherwise only the
    transformed tensors are collected and the new model is calibrated as usual. ``nodes``: the linear layers
    (``convert.linear_nodes``); ``batches()``: the calibration feeds, ``total`` of them; ``cache``: where the
    per-channel extrema are kept. Returns (path, nodes, tensors, ranges or None, manifest entries, the centred layers
    for ``requantized_bias``)."""
    import onnx

    from clipad.calibration.ranges import activation_tensors

    graph = onnx.load(src, load_external_data=False)
    quantizable = set(nodes) - set(kept)
    smooth_targets = [t for t, (_, users) in smoothable(graph).items()
                      if alpha is not None and all(u.name in quantizable for u in users)]
    shift_targets = list(shiftable(graph, quantizable)) if centre else []
    shift_targets = [t for t in shift_targets if t not in smooth_targets]
    tensors = activation_tensors(graph, nodes)
    del graph
    extrema = channel_extrema(src, tensors if derive_ranges else smooth_targets + shift_targets, batches, total,
                              cache)
    model = onnx.load(src)
    entries, scales, shifts, centred = {}, {}, {}, {}
    if alpha is not None:
        readers = sum(len(users) for t, (_, users) in smoothable(model).items() if t in smooth_targets)
        scales = smooth(model, {t: np.maximum(-extrema[t][0], extrema[t][1]) for t in smooth_targets}, alpha)
        entries["smoothquant"] = summary(alpha, scales, readers)
        log.info("      SmoothQuant α %g: %d LayerNorm outputs into %d quantized linear layers%s", alpha, len(scales),
                 readers, ", scales %.3g … %.3g" % (entries["smoothquant"]["scale_min"],
                                                   entries["smoothquant"]["scale_max"]) if scales else "")
    if centre:
        candidates = {t: users for t, users in shiftable(model, quantizable).items() if t in shift_targets}
        shifts = shift(model, extrema, candidates, centred)
        inits = _initializers(model)
        for t in shifts:   # each product before the bias moves by z · Σ_rows W, per output channel
            for matmul, _, _ in candidates[t]:
                if matmul.output[0] in extrema:
                    w = onnx.numpy_helper.to_array(inits[matmul.input[1]]).astype(np.float64)
                    extrema[matmul.output[0]] = (extrema[matmul.output[0]] - shifts[t] * w.sum(axis=0)).astype(
                        np.float32)
        entries["shift"] = {"tensors": len(shifts), "linear_layers": sum(len(candidates[t]) for t in shifts),
                            "shift_min": min(shifts.values(), default=None),
                            "shift_max": max(shifts.values(), default=None), "lopsided_below": LOPSIDED,
                            "tool": SHIFT_TOOL}
        log.info("      centring shift: %d lopsided linear-layer inputs of %d candidates", len(shifts), len(candidates))
    path = os.path.join(work_dir, "model.transformed.onnx")
    onnx.save(model, path)
    new_tensors = activation_tensors(model, nodes)
    del model
    ranges = derived_ranges(new_tensors, extrema, scales, shifts) if derive_ranges else None
    return path, nodes, new_tensors, ranges, entries, centred
