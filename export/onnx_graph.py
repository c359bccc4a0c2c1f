"""Small ONNX graph helpers shared by the exporter's steps (no step imports another through them): the exported
graph's I/O names, the torch module scope a node came from, a topological re-order after graph edits, and the nodes
every low precision keeps FP32 (the head, Crane+'s D-Attn) with the projections that feed the head."""
from __future__ import annotations

from clipad.runtime.errors import ClipadError

INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "image_score")
MEMORY_FEATURES = "patch_features"   # the optional third output (export-engine --memory-features)
SCOPE_KEY = "pkg.torch.onnx.name_scopes"
HEAD_SCOPE = "core.head"
FP32_SCOPES = (HEAD_SCOPE, "core.vision.dattn_weights")   # + Crane+'s D-Attn similarity, mean, mask and softmax


def scopes(node) -> str:
    """The torch module path(s) the exporter recorded for ``node`` ("" when none)."""
    return next((p.value for p in node.metadata_props if p.key == SCOPE_KEY), "")


def topological_order(graph) -> None:
    """Reorder nodes so each comes after its inputs' producers (the converter appends its Casts at the end, which
    the ONNX checker rejects), keeping the original order where it is free."""
    import heapq

    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    needs = [{producer[x] for x in n.input if x in producer and producer[x] != i} for i, n in enumerate(nodes)]
    users = [[] for _ in nodes]
    for i, deps in enumerate(needs):
        for d in deps:
            users[d].append(i)
    waiting = [len(d) for d in needs]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ClipadError("internal error: the converted graph has a cycle")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def head_nodes(model) -> list[str]:
    return [n.name for n in model.graph.node if any(scope in scopes(n) for scope in FP32_SCOPES)]


_PASS_THROUGH = {"Reshape", "Transpose", "Slice", "Gather", "Concat", "Unsqueeze", "Squeeze", "Cast", "Split",
                 "Identity", "Flatten", "Expand", "Div", "ReduceL2", "Clip"}  # data movement and L2 normalisation


def head_feeding_linears(model) -> set[str]:
    """Linear layers whose output reaches the head through data movement, L2 normalisation or a bias add only: the
    final projections into the text-anchor space. Their error lands on the anomaly map undamped, so INT8 leaves them
    float (Crane on magnetic_tile: map Pearson min 0.986 with them quantized, 0.998 kept float)."""
    from clipad.calibration.ranges import constant_names

    consts = constant_names(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    head = set(head_nodes(model))
    todo = [i for n in model.graph.node if n.name in head for i in n.input]
    found, seen = set(), set()
    while todo:
        node = producers.get(todo.pop())
        if node is None or node.name in head or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm", "Conv") and any(i in consts for i in node.input):
            found.add(node.name)
        elif node.op_type in _PASS_THROUGH or (node.op_type == "Add" and any(i in consts for i in node.input)):
            todo += [i for i in node.input if i not in consts]
    return found


WEIGHT_READ_OPS = ("Transpose", "Gather", "Identity")


def fold_constant_weight_reads(model) -> int:
    """Replace every Transpose, Gather or Identity whose inputs are all constants by an initializer holding its
    result (in place); returns how many nodes were folded. The exporter leaves these on weights above its folding
    size limit: Crane's second attention path reads its out-projection weight through a Transpose, AA-CLIP's
    adapters and seg projections through a Gather of a stacked buffer. Folded, they are linear layers with a
    constant weight like any other, which the INT8 quantizers can quantize, the BF16 pass can convert and the head
    rules can see; the numbers do not change (a transpose or a gather is exact)."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    constant_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"
                      and [a.name for a in n.attribute] == ["value"]}
    computed: dict[str, np.ndarray] = {}

    def value(name: str) -> np.ndarray:
        if name in computed:
            return computed[name]
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        return numpy_helper.to_array(constant_nodes[name].attribute[0].t)

    folded = []
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if node.op_type not in WEIGHT_READ_OPS or not inputs \
                or not all(i in computed or i in initializers or i in constant_nodes for i in inputs):
            continue
        attrs = {a.name: a for a in node.attribute}
        data = value(inputs[0])
        if node.op_type == "Transpose":
            perm = list(attrs["perm"].ints) if "perm" in attrs else None
            result = np.transpose(data, perm)
        elif node.op_type == "Gather":
            result = np.take(data, value(inputs[1]), axis=attrs["axis"].i if "axis" in attrs else 0)
        else:
            result = data
        computed[node.output[0]] = np.ascontiguousarray(result)
        folded.append(node)
    if not folded:
        return 0
    for node in folded:
        graph.node.remove(node)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    graph.initializer.extend(numpy_helper.from_array(computed[name], name) for name in computed if name in used)
    unused = [t for t in graph.initializer if t.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(node)
    return len(folded)


def restore_float_weights(model, quantized: set[str], src: str) -> int:
    """onnxruntime's QDQ pass replaces a quantized layer's weight by its INT8 copy and a DequantizeLinear, and a
    float layer sharing that weight (Crane's attention paths share each block's out-projection) is left reading the
    INT8-rounded one: a layer kept float would not be. Give every node outside ``quantized`` the FP32 weight again
    (from ``src``, the FP32 file quantized; in place). Returns how many inputs were restored."""
    import onnx

    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    reads = []   # (node, input index, the FP32 initializer its DequantizeLinear stands for)
    for node in model.graph.node:
        if node.name in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits \
                    and dq.input[0].endswith("_quantized"):
                reads.append((node, i, dq.input[0][:-len("_quantized")]))
    if not reads:
        return 0
    wanted = {original for _, _, original in reads}
    originals = {i.name: i for i in onnx.load(src).graph.initializer if i.name in wanted}
    model.graph.initializer.extend(originals[name] for name in sorted(set(originals) - inits))
    restored = [(node, i, original) for node, i, original in reads if original in originals]
    for node, i, original in restored:
        node.input[i] = original
    return len(restored)
