"""``int8-dyn-bf16``: INT8 weights for OpenVINO, with the activations quantized at run time.

The linear layers' weights are stored INT8 (symmetric, one scale per output channel) behind a DequantizeLinear and
nothing else is quantized: no activation ranges, so no calibration. OpenVINO's CPU plugin compiles such a layer into
a FullyConnected with compressed weights and, with ``DYNAMIC_QUANTIZATION_GROUP_SIZE`` set, quantizes its input per
token in groups of that many channels as it runs, then multiplies in INT8 (VNNI, or AMX where the CPU has it) — the
same idea as ONNX Runtime's dynamic INT8 of ``int8-cpu``, whose scale follows each image, with a finer grain. What
is not quantized follows the BF16 keep-list (``convert_bf16``): the attention as one BF16 chain, the linear layers
kept float BF16, the residual stream, LayerNorm, GELU, the head and the projections that feed it FP32.
"""
from __future__ import annotations

import numpy as np

from clipad.runtime import precisions

WEIGHT_TOOL = "clipad.export.convert_weight_int8"


def int8_per_channel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A [K, N] MatMul weight as INT8 values in [-127, 127] and one FP32 scale per output column (symmetric)."""
    peak = np.abs(weight).max(axis=0)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    return np.clip(np.round(weight / scale), -127, 127).astype(np.int8), scale


def dequantized_weights(model, nodes: list[str]) -> int:
    """Put each named MatMul's constant 2-D weight behind an INT8 DequantizeLinear (in place; a weight shared by
    several layers is stored once); returns how many layers now read an INT8 weight."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    wanted, done, reads, count = set(nodes), {}, [], 0
    for node in graph.node:
        if node.name not in wanted or node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        name = node.input[1]
        if name not in done:
            weight = numpy_helper.to_array(inits[name]).astype(np.float32)
            if weight.ndim != 2:
                continue
            values, scale = int8_per_channel(weight)
            done[name] = f"{name}_int8_dq"
            graph.initializer.extend([numpy_helper.from_array(values, f"{name}_int8"),
                                      numpy_helper.from_array(scale, f"{name}_int8_scale")])
            reads.append(helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_int8_scale"], [done[name]],
                                          axis=1, name=f"{name}_int8_dequantize"))
        node.input[1] = done[name]
        count += 1
    nodes_now = reads + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes_now)
    used = {i for n in graph.node for i in n.input}
    for tensor in [t for t in graph.initializer if t.name in done and t.name not in used]:
        graph.initializer.remove(tensor)
    return count


def to_int8_dynamic_bf16(src: str, dst: str, group_size: int, keep_nodes: tuple[str, ...] = (),
                         keep_float: tuple[str, ...] = ()) -> dict:
    """Write ``dst`` from the FP32 ``src``: INT8 weights for the linear MatMuls (but the head's inputs, ``keep_nodes``
    and ``keep_float``), then the BF16 keep-list for the rest; returns the manifest's conversion record."""
    import onnx

    from .convert import kept_by_keep_float, linear_nodes
    from .convert_bf16 import BF16_CONVERTER, bf16_products
    from .onnx_graph import head_feeding_linears

    model = onnx.load(src)
    kept = head_feeding_linears(model) | set(keep_nodes) | kept_by_keep_float(model, keep_float)
    matmuls = {n.name for n in model.graph.node if n.op_type == "MatMul"}
    nodes = [n for n in linear_nodes(model) if n in matmuls and n not in kept]
    quantized = dequantized_weights(model, nodes)
    bf16 = bf16_products(model, attention=True)
    onnx.save(model, dst)
    return {"quantized_nodes": quantized, "kept_float": list(keep_float), "kept_float_nodes": sorted(kept),
            "high_precision": precisions.BF16_REMAINDER, "dynamic_quantization_group_size": group_size,
            **bf16, "bf16_converter": BF16_CONVERTER,
            "tool": f"{WEIGHT_TOOL} (INT8 weights per output channel, symmetric) + BF16 attention and float linear "
                    f"layers; OpenVINO quantizes activations at run time (DYNAMIC_QUANTIZATION_GROUP_SIZE "
                    f"{group_size})"}
