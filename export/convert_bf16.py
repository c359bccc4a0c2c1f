"""BF16 with the FP32 keep-list: ``model.bf16.onnx`` from the FP32 export.

OpenVINO's BF16 inference hint turns the whole graph BF16 (residual stream, LayerNorm, softmax and the head
included: map Pearson 0.992 on seeded ViT-L), and the per-node marks meant to keep nodes f32 do not survive the CPU
plugin's rewrites. So the precision is written into the file instead, as the FP16 file does: the linear layers'
weights are stored BF16 and each linear MatMul runs on BF16 operands (a Cast of its activation input), its output
cast back to FP32 before the bias Add. Everything else — residual Adds, LayerNorm, softmax, L2 norms, the head and
the projections that feed it — stays FP32. With ``attention=True`` the attention runs on BF16 tensors too, as one
chain q·kᵀ → softmax → ·v with no Cast inside, which OpenVINO fuses into one attention kernel (the softmax on the
BF16 logits). The file is compiled by OpenVINO at f32 precision, which keeps the BF16 products as written.
The same pass turns a Q/DQ INT8 file with an FP32 remainder into ``int8-bf16``'s (``INT8`` products untouched:
their weights come from DequantizeLinear, not from a constant).
"""
from __future__ import annotations

import numpy as np

from .onnx_graph import FP32_SCOPES, head_feeding_linears, topological_order
from .onnx_graph import scopes as _scopes

BF16_CONVERTER = "clipad.export.convert_bf16"
_LAYOUT_OPS = ("Transpose", "Cast", "Identity")


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
    """Rewrite ``model`` in place: BF16 operands for the linear MatMuls (and the attention when asked).
    Returns what was converted and what was kept FP32."""
    from onnx import TensorProto, helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
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

    def bf16_output(node, to: int = TensorProto.FLOAT) -> None:
        out = node.output[0]
        node.output[0] = f"{out}__bf16_out"
        new_nodes.append(helper.make_node("Cast", [node.output[0]], [out], name=f"{out}__to_fp32", to=to))

    chained = _bf16_attention(graph, producers, inits, bf16_input, bf16_output) if attention else []
    for node in list(graph.node):
        if node.op_type != "MatMul" or node.name in chained or any(scope in _scopes(node) for scope in FP32_SCOPES):
            continue
        if any(_dequantized(x, producers) for x in node.input):
            continue   # an INT8 product of a Q/DQ file (int8-bf16): its operands are INT8 already
        is_linear = _constant_root(node.input[1], inits, producers) is not None
        if is_linear and node.name in head_inputs:
            kept.append(node.name)
            continue
        if not is_linear and not attention:
            continue
        inputs = [bf16_input(x) for x in node.input]
        del node.input[:]
        node.input.extend(inputs)
        bf16_output(node)
        (linear if is_linear else products).append(node.name)
    used = {x for n in graph.node for x in n.input} | {x for n in new_nodes for x in n.input}
    unused = [t for t in graph.initializer if t.name in weights and t.name not in used]
    for t in unused:   # the FP32 copy of a weight only BF16 products used
        graph.initializer.remove(t)
    graph.node.extend(new_nodes)
    topological_order(graph)
    return {"bf16_linear_layers": len(linear), "bf16_attention_products": len(products) + len(chained),
            "bf16_attention_chains": len(chained) // 2,
            "fp32_head_projections": sorted(kept), "attention_bf16": attention}


def _constant_root(name: str, inits, producers) -> str | None:
    """The initializer ``name`` is computed from by layout-only ops (a weight transposed in the graph: Crane's
    second out-projection), or None for an activation."""
    while name not in inits:
        node = producers.get(name)
        if node is None or node.op_type not in _LAYOUT_OPS:
            return None
        name = node.input[0]
    return name


def _dequantized(name: str, producers) -> bool:
    return getattr(producers.get(name), "op_type", None) == "DequantizeLinear"


def _bf16_attention(graph, producers, inits, bf16_input, bf16_output) -> list[str]:
    """q·kᵀ → softmax → ·v on BF16 tensors with no Cast inside the chain, so OpenVINO fuses it into one attention
    kernel (a Cast between the products and the softmax splits it into three slower ones: 2.2 s vs 3.1 s per image
    at ViT-L@518). The logits and the softmax output were BF16 before too (the products' own output type); the
    Casts removed here only moved them through FP32. Returns the names of the two products of each chain."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)

    def through_casts_up(tensor: str):
        node = producers.get(tensor)
        while node is not None and node.op_type == "Cast":
            node = producers.get(node.input[0])
        return node

    def through_casts_down(tensor: str):
        users = consumers.get(tensor, [])
        while len(users) == 1 and users[0].op_type == "Cast":
            users = consumers.get(users[0].output[0], [])
        return users[0] if len(users) == 1 else None

    chained = []
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        if any(scope in _scopes(softmax) for scope in FP32_SCOPES):
            continue
        logits, mixing = through_casts_up(softmax.input[0]), through_casts_down(softmax.output[0])
        products = [logits, mixing]
        if any(p is None or p.op_type != "MatMul" for p in products) \
                or through_casts_down(logits.output[0]) is not softmax \
                or any(_constant_root(x, inits, producers) or _dequantized(x, producers)
                       for p in products for x in p.input):
            continue
        weights_at = [i for i, x in enumerate(mixing.input) if through_casts_up(x) is softmax]
        if len(weights_at) != 1:
            continue
        logits.input[0], logits.input[1] = bf16_input(logits.input[0]), bf16_input(logits.input[1])
        logits.output[0] = softmax.input[0] = f"{logits.output[0]}__bf16_chain"
        softmax.output[0] = mixing.input[weights_at[0]] = f"{softmax.output[0]}__bf16_chain"
        values_at = 1 - weights_at[0]
        mixing.input[values_at] = bf16_input(mixing.input[values_at])
        bf16_output(mixing, _elem_type(graph, mixing.output[0]))
        chained += [logits.name, mixing.name]
    _drop_orphaned_casts(graph)
    return chained


def _elem_type(graph, tensor: str) -> int:
    from onnx import TensorProto

    typed = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.output]}
    return typed.get(tensor) or TensorProto.FLOAT


def _drop_orphaned_casts(graph) -> None:
    """Casts that fed a rewired chain read a tensor nothing produces any more: remove them (and their value_info)."""
    while True:
        known = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} \
            | {t.name for t in graph.initializer}
        orphans = [n for n in graph.node if n.op_type == "Cast" and n.input[0] not in known]
        if not orphans:
            return
        gone = {o for n in orphans for o in n.output}
        for node in orphans:
            graph.node.remove(node)
        for info in [v for v in graph.value_info if v.name in gone]:
            graph.value_info.remove(info)


def to_bf16(src: str, dst: str, attention: bool = False) -> dict:
    import onnx

    model = onnx.load(src)
    info = bf16_products(model, attention=attention)
    onnx.save(model, dst)
    return {**info, "converter": BF16_CONVERTER,
            "kept_fp32": "residual stream, LayerNorm, softmax, L2 norms, the head and the projections feeding it"}
