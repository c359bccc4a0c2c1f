"""BF16 with the FP32 keep-list: ``model.bf16.onnx`` from the FP32 export.

OpenVINO's BF16 inference hint turns the whole graph BF16 (residual stream, LayerNorm, softmax and the head
included: map Pearson 0.992 on seeded ViT-L), and the per-node marks meant to keep nodes f32 do not survive the CPU
plugin's rewrites. So the precision is written into the file instead, as the FP16 file does: the linear layers'
weights are stored BF16 and each linear MatMul runs on BF16 operands (a Cast of its activation input), its output
cast back to FP32 before the bias Add. Everything else — residual Adds, LayerNorm, softmax, L2 norms, the head and
the projections that feed it — stays FP32. With ``attention=True`` the two attention products (q·kᵀ, softmax·v) get
BF16 operands too. The file is compiled by OpenVINO at f32 precision, which keeps the BF16 products as written.
"""
from __future__ import annotations

import numpy as np

from .convert import FP32_SCOPES, _scopes, head_feeding_linears, topological_order

BF16_CONVERTER = "clipad.export.convert_bf16"


def float_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def bf16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _bf16_initializer(tensor, name: str):
    from onnx import TensorProto, numpy_helper

    values = numpy_helper.to_array(tensor).astype(np.float32)
    out = TensorProto(name=name, data_type=TensorProto.BFLOAT16, dims=list(values.shape))
    out.raw_data = float_to_bf16_bits(values).tobytes()
    return out


def bf16_products(model, attention: bool = False) -> dict:
    """Rewrite ``model`` in place: BF16 operands for the linear MatMuls (and the attention products when asked).
    Returns what was converted and what was kept FP32."""
    from onnx import TensorProto, helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    head_inputs = head_feeding_linears(model)
    casts: dict[str, str] = {}        # FP32 tensor -> its BF16 Cast output
    weights: dict[str, str] = {}      # FP32 initializer -> its BF16 copy
    new_nodes, linear, products, kept = [], [], [], []

    def bf16_input(name: str) -> str:
        if name in inits:
            if name not in weights:
                weights[name] = f"{name}__bf16"
                graph.initializer.append(_bf16_initializer(inits[name], weights[name]))
            return weights[name]
        if name not in casts:
            casts[name] = f"{name}__bf16_in"
            new_nodes.append(helper.make_node("Cast", [name], [casts[name]], name=f"{name}__to_bf16",
                                              to=TensorProto.BFLOAT16))
        return casts[name]

    for node in list(graph.node):
        if node.op_type != "MatMul" or any(scope in _scopes(node) for scope in FP32_SCOPES):
            continue
        is_linear = node.input[1] in inits
        if is_linear and node.name in head_inputs:
            kept.append(node.name)
            continue
        if not is_linear and not attention:
            continue
        inputs = [bf16_input(x) for x in node.input]
        out = node.output[0]
        del node.input[:]
        node.input.extend(inputs)
        node.output[0] = f"{out}__bf16_out"
        new_nodes.append(helper.make_node("Cast", [node.output[0]], [out], name=f"{out}__to_fp32",
                                          to=TensorProto.FLOAT))
        (linear if is_linear else products).append(node.name)
    used = {x for n in graph.node for x in n.input} | {x for n in new_nodes for x in n.input}
    unused = [t for t in graph.initializer if t.name in weights and t.name not in used]
    for t in unused:   # the FP32 copy of a weight only BF16 products used
        graph.initializer.remove(t)
    graph.node.extend(new_nodes)
    topological_order(graph)
    return {"bf16_linear_layers": len(linear), "bf16_attention_products": len(products),
            "fp32_head_projections": sorted(kept), "attention_bf16": attention}


def to_bf16(src: str, dst: str, attention: bool = False) -> dict:
    import onnx

    model = onnx.load(src)
    info = bf16_products(model, attention=attention)
    onnx.save(model, dst)
    return {**info, "converter": BF16_CONVERTER,
            "kept_fp32": "residual stream, LayerNorm, softmax, L2 norms, the head and the projections feeding it"}
