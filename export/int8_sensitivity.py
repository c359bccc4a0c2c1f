"""INT8 sensitivity pass: which linear layers move the OK/NG decision score most when quantized, measured, so that an
INT8 file whose gate fails keeps the worst of them float and is made again (``precision_step``).

Measured in one ONNX Runtime session on a gate-only copy of the FP32 graph in which each linear layer's activation and
weight go through their INT8 rounding (``DynamicQuantizeLinear`` → ``DequantizeLinear`` for the activation, as ONNX
Runtime's dynamic quantization does at run time; symmetric per-output-channel INT8 for the weight), blended with the
float values by one switch per group of layers (a graph input): switch 1 is the group quantized, 0 float. One pass
with all switches 0 is the reference, then one pass per group with only its switch on, on a few images: the effect
of a group is its largest |Δ decision score| divided by the spread of the reference decision scores over those
images' normals (the margin a threshold has); its map effect is 1 − the lowest map Pearson against the reference
over those images (the gate's map measure), which ranks the groups when the gate failed on the map alone.
Groups are runs of ``GROUP_SIZE`` linear layers in graph order, about
one transformer block (the attention projections carry no block scope in the graph), per tower (Crane+'s DINOv2
tower apart). For a static Q/DQ file (``int8``, ``int8-bf16``), given its calibrated activation ranges, each
activation goes through the file's own rounding instead (``QuantizeLinear`` → ``DequantizeLinear`` at the symmetric
scale max|range| / 127 that quantize_static derives from those ranges), not the per-image dynamic rounding, which
is not that file's (Crane ``int8-bf16`` at ViT-L: the group ranked first, kept float, lowered the real file's map).
The remainder's BF16 and the backend's kernels are not modelled; the gate judges the real file.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass

import numpy as np

from clipad.runtime.compare import map_pearson
from clipad.runtime.errors import ClipadError

from .onnx_graph import INPUT_NAME, OUTPUT_NAMES, topological_order
from .onnx_graph import scopes as _scopes

log = logging.getLogger("clipad")
SWITCHES = "int8_group_switches"
GROUP_SIZE = 4
DINO_SCOPE = "core.vision.dino"


@dataclass
class Group:
    name: str            # "clip 7: node_MatMul_300 … node_MatMul_306"
    tower: str           # "clip" or "dino"
    layers: list[str]
    effect: float = float("nan")   # max |Δ decision score| / reference spread, this group alone quantized
    map_effect: float = float("nan")   # 1 − min map Pearson against the reference, this group alone quantized


def weight_of(node, initializers: dict):
    """The 2-D constant weight a MatMul multiplies by (input 1), or None."""
    if node.op_type != "MatMul" or len(node.input) != 2:
        return None
    w = initializers.get(node.input[1])
    return w if w is not None and len(w.dims) == 2 else None


def make_groups(model, candidates: list[str]) -> list[Group]:
    initializers = {i.name: i for i in model.graph.initializer}
    wanted = set(candidates)
    groups: list[Group] = []
    runs = {"clip": [], "dino": []}
    for node in model.graph.node:
        if node.name in wanted and weight_of(node, initializers) is not None:
            runs["dino" if DINO_SCOPE in _scopes(node) else "clip"].append(node.name)
    for tower, names in runs.items():
        for start in range(0, len(names), GROUP_SIZE):
            part = names[start:start + GROUP_SIZE]
            groups.append(Group(f"{tower} {start // GROUP_SIZE}: {part[0]} … {part[-1]}", tower, part))
    return groups


def static_scale(absmax: float) -> np.float32:
    """The activation scale quantize_static gives a symmetric INT8 tensor whose calibrated range is ±``absmax``."""
    return np.float32(max(float(absmax), 1e-12) / 127.0)


def write_switched_copy(src: str, dst: str, groups: list[Group], activation_absmax: dict | None = None) -> None:
    """The gate-only graph (see the module): every grouped MatMul reads x + s·(q(x) − x) and W + s·(q(W) − W);
    q(x) is static at ``activation_absmax[x]``'s scale where given, else dynamic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(src)
    initializers = {i.name: i for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    added, inits = [], []
    for g, group in enumerate(groups):
        s = f"int8_switch_{g}"
        inits.append(numpy_helper.from_array(np.array([g], np.int64), s + "_index"))
        added.append(helper.make_node("Gather", [SWITCHES, s + "_index"], [s], name=s))
        for name in group.layers:
            node = by_name[name]
            x, w_name = node.input[0], node.input[1]
            w = numpy_helper.to_array(initializers[w_name]).astype(np.float32)
            scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0
            p = f"int8_fq_{name}"
            inits += [numpy_helper.from_array(scale.astype(np.float32), p + "_wscale"),
                      numpy_helper.from_array(np.zeros(scale.shape, np.int8), p + "_wzero")]
            added += [
                helper.make_node("QuantizeLinear", [w_name, p + "_wscale", p + "_wzero"], [p + "_wq"], axis=1),
                helper.make_node("DequantizeLinear", [p + "_wq", p + "_wscale", p + "_wzero"], [p + "_wdq"], axis=1),
                helper.make_node("Sub", [p + "_wdq", w_name], [p + "_wdelta"]),
                helper.make_node("Mul", [p + "_wdelta", s], [p + "_wstep"]),
                helper.make_node("Add", [w_name, p + "_wstep"], [p + "_w"]),
                *_activation_rounding(x, p, (activation_absmax or {}).get(x), inits),
                helper.make_node("Sub", [p + "_xdq", x], [p + "_xdelta"]),
                helper.make_node("Mul", [p + "_xdelta", s], [p + "_xstep"]),
                helper.make_node("Add", [x, p + "_xstep"], [p + "_x"])]
            node.input[0], node.input[1] = p + "_x", p + "_w"
    model.graph.initializer.extend(inits)
    model.graph.node.extend(added)
    model.graph.input.append(helper.make_tensor_value_info(SWITCHES, TensorProto.FLOAT, [len(groups)]))
    topological_order(model.graph)
    onnx.save(model, dst)


def _activation_rounding(x: str, p: str, absmax, inits: list) -> list:
    """Nodes from ``x`` to its INT8-rounded value ``p_xdq``: static at ``absmax``'s scale, or dynamic (None)."""
    from onnx import helper, numpy_helper

    if absmax is None:
        return [helper.make_node("DynamicQuantizeLinear", [x], [p + "_xq", p + "_xs", p + "_xz"]),
                helper.make_node("DequantizeLinear", [p + "_xq", p + "_xs", p + "_xz"], [p + "_xdq"])]
    inits += [numpy_helper.from_array(static_scale(absmax), p + "_xs"),
              numpy_helper.from_array(np.array(0, np.int8), p + "_xz")]
    return [helper.make_node("QuantizeLinear", [x, p + "_xs", p + "_xz"], [p + "_xq"]),
            helper.make_node("DequantizeLinear", [p + "_xq", p + "_xs", p + "_xz"], [p + "_xdq"])]


def measure(fp32_file: str, groups: list[Group], images: np.ndarray, batch_min: int, rule: str,
            normals_count: int, progress=None, rank_by: str = "decision",
            activation_absmax: dict | None = None) -> list[Group]:
    """Each group's (``make_groups``) effects on the decision score and on the map (see the module), worst first by
    ``rank_by``. ``images``: the first ``normals_count`` are normal images (their reference spread is the scale),
    the rest verify images. ``activation_absmax``: a static file's calibrated range per activation tensor."""
    import onnxruntime as ort

    from clipad.runtime.decision_check import decision_scores

    if not groups:
        raise ClipadError("internal error: no linear layer to measure")
    with tempfile.TemporaryDirectory(prefix=".sensitivity-", dir=os.path.dirname(os.path.abspath(fp32_file))) as tmp:
        path = os.path.join(tmp, "switched.onnx")
        write_switched_copy(fp32_file, path, groups, activation_absmax)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

        def run(switches: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
            """(decision scores, each image's maps) with these switches."""
            rows, maps_kept = [], []
            for image in images:
                maps, scores = session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.repeat(image[None], batch_min, 0),
                                                                SWITCHES: switches})
                rows.append((maps[:1].reshape(1, maps.shape[1], -1).max(axis=2), scores[:1].reshape(1, -1)))
                maps_kept.append(maps[0])
            map_max, score = (np.concatenate(p).astype(np.float64) for p in zip(*rows))
            constants = {"p_min": float(map_max[:normals_count].min()), "p_max": float(map_max[:normals_count].max()),
                         "i_min": float(score[:normals_count].min()), "i_max": float(score[:normals_count].max())}
            return decision_scores(rule, map_max, score, constants), maps_kept

        off = np.zeros(len(groups), np.float32)
        reference, reference_maps = run(off)
        spread = np.maximum(np.ptp(reference[:normals_count], axis=0), 1e-12)
        if progress:
            progress(1)
        for g, group in enumerate(groups):
            on = off.copy()
            on[g] = 1.0
            decided, maps = run(on)
            group.effect = float((np.abs(decided - reference) / spread).max())
            group.map_effect = 1.0 - min(min(map_pearson(r[k], m[k]) for k in range(len(r)))
                                         for r, m in zip(reference_maps, maps))
            if progress:
                progress(1)
        session = None   # released before the folder holding its file goes
    return sorted(groups, key=lambda grp: -(grp.map_effect if rank_by == "map" else grp.effect))


def keep_order(groups: list[Group], clip_layers: int, already: int = 0, share: float = 0.25) -> list[list[Group]]:
    """The kept sets to try, worst first, doubling: 1, 2, 4 … groups, then the largest set whose CLIP-tower float
    layers (``already`` float ones, e.g. the projections into the head, included) stay within ``share`` of its
    ``clip_layers`` linear layers (Crane+'s DINOv2 tower is counted apart)."""
    limit = int(share * clip_layers) - already

    def fits(k: int) -> bool:
        return sum(len(g.layers) for g in groups[:k] if g.tower == "clip") <= limit

    largest = max((k for k in range(len(groups) + 1) if fits(k)), default=0)   # clip layers grow with k
    sizes = [k for k in (2 ** i for i in range(len(groups).bit_length() + 1)) if k < largest] + [largest]
    return [groups[:k] for k in sizes if k]


def record(groups: list[Group], kept: list[Group], rounds: list[dict], images: int, rank_by: str = "decision",
           static: bool = False) -> dict:
    """What the manifest's conversion entry keeps of the pass."""
    activations = "static activations at the calibrated scales" if static else "dynamic activations"
    return {"method": f"per-group fake INT8 ({activations}, per-channel weights) in ONNX Runtime, |Δ decision "
                      "score| / spread of the normal images' reference scores (effect) and 1 − min map Pearson "
                      "(map_effect)",
            "ranked_by": "map_effect" if rank_by == "map" else "effect",
            "images": images, "group_size": GROUP_SIZE,
            "groups": [{k: v for k, v in asdict(g).items()} for g in groups],
            "kept_groups": [g.name for g in kept], "kept_layers": sorted(n for g in kept for n in g.layers),
            "rounds": rounds}
