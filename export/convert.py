"""FP16 and INT8 ONNX from the FP32 export, with accuracy gates against FP32 (ONNX Runtime, CPU).

TensorRT 11 has no precision builder flags or implicit calibration: precision lives in the ONNX (mixed FP16/FP32;
explicit symmetric Q/DQ for INT8), which builds the same way on TensorRT 10.3 … 11.x. What stays FP32: the whole
head (similarities, softmax/sigmoid, blur, resize) and every LayerNormalization and L2 norm (the residual stream of
CLIP ViTs carries outliers that overflow FP16 once squared). INT8 quantizes only the inputs of MatMul/Conv nodes that
have a weight, i.e. the linear layers; residual Adds, LayerNorm, softmax, attention products and the head stay float
(FP16 by default, with the same FP32 keep-list).
"""
from __future__ import annotations

import contextlib
import logging
import os

import numpy as np

from clipad.runtime import precisions
from clipad.runtime.batching import chunks
from clipad.runtime.compare import GateReport, gate
from clipad.runtime.errors import ClipadError

from .onnx_graph import scopes as _scopes
from .onnx_graph import HEAD_SCOPE  # noqa: F401  (read as convert.HEAD_SCOPE)
from .onnx_graph import FP32_SCOPES, head_feeding_linears, head_nodes, restore_float_weights, topological_order

log = logging.getLogger("clipad")
FP32_OPS = ["LayerNormalization", "ReduceL2", "ReduceMean", "ReduceSum", "Clip", "Softmax", "Sigmoid", "Resize",
            "Erf"]
CALIB_METHODS = ("minmax", "entropy", "percentile")
INT8_FP16_OPSET = 19


def _half(model, opset: int | None = None):
    """onnxruntime's float16 converter with our FP32 keep-list: the head and the FP32_OPS stay FP32; FP32 I/O."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    if opset:
        for entry in model.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = max(entry.version, opset)
    keep = head_nodes(model)
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS, node_block_list=keep,
                                    min_positive_val=1e-7, max_finite_val=1e4)
    drop_fp16_round_trips(half)
    topological_order(half.graph)
    return half, len(keep)


def _cast_to(node) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def drop_fp16_round_trips(model) -> int:
    """The float16 converter wraps every kept-FP32 node in Casts of its own, so a tensor flowing from one FP32 node
    to the next goes FP32 → FP16 → FP32: rounded, and clamped at 65504. Crane+'s ‖Σ f̂‖² (7e5 at 1369 patches)
    became inf there and every FP16 map NaN; the "FP32" head was rounded to FP16 between each of its ops. Each such
    pair becomes an Identity of the FP32 tensor, and the FP16 Casts left without a consumer go. Returns how many."""
    from onnx import TensorProto, helper

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    types = {t.name: t.type.tensor_type.elem_type for t in [*graph.input, *graph.value_info]}
    types.update((t.name, t.data_type) for t in graph.initializer)
    fixed = 0
    for i, node in enumerate(graph.node):
        first = producer.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if first is not None and first.op_type == "Cast" and _cast_to(node) == TensorProto.FLOAT \
                and _cast_to(first) == TensorProto.FLOAT16 and types.get(first.input[0]) == TensorProto.FLOAT:
            graph.node[i].CopyFrom(helper.make_node("Identity", [first.input[0]], list(node.output), name=node.name))
            fixed += 1
    used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node if n.op_type == "Cast" and _cast_to(n) == TensorProto.FLOAT16
            and not any(o in used for o in n.output)]
    for node in dead:
        graph.node.remove(node)
    return fixed


def to_fp16(src: str, dst: str) -> dict:
    """Mixed precision with FP32 I/O via onnxruntime's float16 converter; returns what stayed FP32."""
    import onnx

    fp16, kept = _half(onnx.load(src))
    onnx.save(fp16, dst)
    return {"fp32_ops": FP32_OPS, "fp32_head_nodes": kept, "converter": "onnxruntime.transformers.float16"}


def _kept_by(node, keep: str) -> bool:
    return keep == node.name or keep in _scopes(node)


def linear_nodes(model, keep_float: tuple[str, ...] = ()) -> list[str]:
    """MatMul/Gemm/Conv nodes with a constant weight input, outside the head and outside any module whose scope
    contains one of ``keep_float`` (e.g. "mlp.c_proj"); an entry that is a node's name (as a manifest's
    ``kept_float_nodes`` lists them) keeps that node."""
    from clipad.calibration.ranges import constant_names

    consts = constant_names(model)
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")
            and any(i in consts for i in n.input) and not any(scope in _scopes(n) for scope in FP32_SCOPES)
            and not any(_kept_by(n, k) for k in keep_float)]


def kept_by_keep_float(model, keep_float: tuple[str, ...]) -> set[str]:
    """The linear layers ``keep_float`` leaves float; an entry that matches none is refused, so a mistyped scope or
    a node name from another model's manifest is not silently ignored."""
    names = set(linear_nodes(model))
    linears = [n for n in model.graph.node if n.name in names]
    unmatched = [k for k in keep_float if not any(_kept_by(n, k) for n in linears)]
    if unmatched:
        raise ClipadError(f"--int8-keep-float {' '.join(unmatched)}: matches no linear layer of this model (give a "
                          "module scope such as mlp.c_proj or resblocks.23., or node names from this export's "
                          "manifest, kept_float_nodes)")
    return {n.name for n in linears if any(_kept_by(n, k) for k in keep_float)}


class _DropPreprocessAdvice(logging.Filter):
    """quantize_static warns twice to run its CPU-oriented shape/fusion pre-processing; our graphs are meant for
    TensorRT, which does its own fusion, so the advice does not apply."""

    def filter(self, record):
        return not record.getMessage().startswith("Please consider")


@contextlib.contextmanager
def _quiet_preprocess_advice():
    root, drop = logging.getLogger(), _DropPreprocessAdvice()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _batches(input_name: str, data: np.ndarray, batch: int):
    for chunk, _ in chunks(data, batch, batch):
        yield {input_name: chunk}


def _ranges_key(src: str, calib: np.ndarray, method: str, batch: int) -> str:
    import hashlib

    from clipad.runtime.manifest import sha256_file

    h = hashlib.sha256(f"{sha256_file(src)}|{method}|{batch}|{calib.shape}".encode())
    h.update(np.ascontiguousarray(calib).data)
    return h.hexdigest()[:24]


def calibrate(src: str, calib: np.ndarray, method: str, batch: int, cache_dir: str | None):
    """Activation ranges of the FP32 model's linear-layer tensors (cached per model, images and method)."""
    import onnx
    from onnxruntime.quantization.calibrate import load_tensors_data, save_tensors_data

    from clipad.calibration.ranges import activation_tensors, collect_ranges

    model = onnx.load(src, load_external_data=False)
    nodes = linear_nodes(model)
    tensors = activation_tensors(model, nodes)
    input_name = model.graph.input[0].name
    del model
    cache = os.path.join(cache_dir, f"ranges-{_ranges_key(src, calib, method, batch)}.json") if cache_dir else None
    if cache and os.path.isfile(cache):
        try:
            ranges = load_tensors_data(cache)
            if set(ranges.keys()) == set(tensors):
                log.info("      activation ranges from cache %s", cache)
                return nodes, tensors, ranges
        except (ValueError, KeyError, OSError):
            pass  # unreadable cache: calibrate again and overwrite it
    ranges = collect_ranges(src, tensors, _batches(input_name, calib, batch), method, total=-(-len(calib) // batch))
    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        save_tensors_data(ranges, cache)  # atomic (temp file + rename)
    return nodes, tensors, ranges


HALF_REMAINDER = precisions.INT8_REMAINDERS[0]


def to_int8(src: str, dst: str, calib: np.ndarray, method: str, batch: int, high_precision: str = HALF_REMAINDER,
            cache_dir: str | None = None, keep_float: tuple[str, ...] = (), keep_nodes: tuple[str, ...] = (),
            quantizer: str = "onnxruntime", smooth_alpha: float | None = None, centre: bool = False) -> dict:
    """Static INT8 Q/DQ (symmetric, per-channel weights) TensorRT accepts: ranges from our one-batch-at-a-time
    collector (clipad.calibration.ranges), Q/DQ placement by onnxruntime's quantize_static. Everything that is not a
    quantized linear layer runs in ``high_precision``: fp16 (as ModelOpt's default; the FP32 keep-list of --precision
    fp16 still applies) or fp32. A strongly typed TensorRT build runs exactly these types, so an FP32 remainder makes
    attention, GELU and the residual stream FP32 on the GPU. ``quantizer`` "nncf": NNCF places and calibrates the
    same layers' Q/DQ instead (``quantize_nncf``); "modelopt": NVIDIA ModelOpt does, in its own environment
    (``quantize_modelopt``). ``smooth_alpha``: SmoothQuant's α; ``centre``: centre lopsided inputs (both in
    ``smoothquant``); the quantizer then works on the transformed FP32 model."""
    import inspect
    import tempfile

    import onnx
    from onnxruntime.quantization import quantize_static

    if method not in CALIB_METHODS:
        raise ClipadError(f"--calib-method {method!r}: choose one of {', '.join(CALIB_METHODS)}")
    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        import onnxruntime

        from clipad.runtime.extras import onnxruntime_upgrade_hint

        raise ClipadError(f"INT8 export needs ONNX Runtime >= 1.32 (installed {onnxruntime.__version__}): "
                          f"{onnxruntime_upgrade_hint('1.32')}")
    graph = onnx.load(src, load_external_data=False)
    user_kept = kept_by_keep_float(graph, keep_float)   # before calibration: a typo costs a second, not half an hour
    del graph
    with tempfile.TemporaryDirectory(prefix=".int8-smooth-", dir=os.path.dirname(os.path.abspath(dst))) as work:
        made = _to_int8(src, dst, calib, method, batch, high_precision, cache_dir, user_kept, keep_nodes, quantizer,
                        smooth_alpha, centre, work)
    made["kept_float"] = list(keep_float)
    return made


def _to_int8(src, dst, calib, method, batch, high_precision, cache_dir, user_kept, keep_nodes, quantizer,
             smooth_alpha, centre, work) -> dict:
    import onnx

    from . import quantize_modelopt, quantize_nncf, smoothquant

    transforms, centred, nodes, tensors, ranges = {}, {}, None, None, None
    if smooth_alpha is not None or centre:
        derive = quantizer == "onnxruntime" and method == "minmax"
        graph = onnx.load(src, load_external_data=False)
        kept = user_kept | set(keep_nodes) | head_feeding_linears(graph)
        linears, input_name = linear_nodes(graph), graph.graph.input[0].name
        del graph
        cache = os.path.join(cache_dir, f"extrema-{_ranges_key(src, calib, 'extrema', batch)}.npz") if cache_dir \
            else None
        src, nodes, tensors, ranges, transforms, centred = smoothquant.transformed(
            src, work, linears, lambda: _batches(input_name, calib, batch), -(-len(calib) // batch), cache,
            smooth_alpha, centre, derive, kept)
    if quantizer in ("nncf", "modelopt"):
        module = quantize_nncf if quantizer == "nncf" else quantize_modelopt
        if quantizer == "modelopt":
            quantize_modelopt.method_for(method)
        why = module.available()   # ModelOpt's answers from a child process: asked once
        if why:
            raise ClipadError(why)
        nodes, tensors, ranges = linear_nodes(onnx.load(src, load_external_data=False)), None, None
    elif ranges is None:
        nodes, tensors, ranges = calibrate(src, calib, method, batch, cache_dir)
    # Loaded again rather than held through calibration: at ViT-L the proto is 1.3 GB next to the session.
    graph = onnx.load(src, load_external_data=False)
    kept = (user_kept | head_feeding_linears(graph) | set(keep_nodes)) & set(nodes)
    del graph
    nodes = [n for n in nodes if n not in kept]
    version, batches = None, None
    if quantizer == "nncf":
        model = quantize_nncf.quantize(src, calib, batch, nodes)
    elif quantizer == "modelopt":
        model, version, batches = quantize_modelopt.quantize(src, calib, nodes, method,
                                                             os.path.dirname(os.path.abspath(dst)))
    else:
        model = _quantize_static(src, dst, nodes, ranges)
    restored = keep_float_consumers(model, set(nodes))
    weights_restored = restore_float_weights(model, set(nodes), src)
    if "shift" in transforms:
        transforms["shift"]["biases_from_quantized_weights"] = smoothquant.requantized_bias(model, centred)
    trt_ok, trt_why = quantize_nncf.tensorrt_compatible(model)
    half, bf16 = high_precision == HALF_REMAINDER, {}
    if half:
        # Q/DQ on FP16 tensors with FP16 scales needs opset 19 (ops used here mean the same in 18 and 19).
        model, _ = _half(model, opset=INT8_FP16_OPSET)
    elif high_precision == precisions.BF16_REMAINDER:
        from .convert_bf16 import BF16_CONVERTER, bf16_products

        bf16 = {**bf16_products(model, attention=True), "bf16_converter": BF16_CONVERTER}
    onnx.save(model, dst)
    tool = {"nncf": "nncf.quantize(ONNX, PERFORMANCE preset, transformer, fast bias correction, SmoothQuant off)",
            "modelopt": f"modelopt.onnx.quantization.quantize(int8, {quantize_modelopt.METHODS.get(method)}, CPU "
                        f"calibration, attention Q/DQ off; nvidia-modelopt {version}, own environment)",
            }.get(quantizer, "clipad.calibration.ranges + onnxruntime.quantization.quantize_static(QDQ, symmetric, "
                             "per-channel)")
    return {"quantized_nodes": len(nodes), "calibrated_tensors": len(tensors) if tensors else None,
            "float_consumers_restored": restored, "float_weights_restored": weights_restored, "quantizer": quantizer,
            "calibration_images": int(len(calib)), "method": "nncf" if quantizer == "nncf" else method,
            "high_precision": high_precision, "kept_float_nodes": sorted(kept),
            **transforms,
            "fp32_ops": FP32_OPS if half else "all but the BF16 ones" if bf16 else "all",
            "opset": INT8_FP16_OPSET if half else None,
            "tensorrt_compatible": trt_ok, **({"tensorrt_incompatible": trt_why} if not trt_ok else {}),
            **({"calibration_batches_read": batches} if batches is not None else {}),
            **bf16,
            "tool": tool + (" + onnxruntime.transformers.float16" if half else "")
            + (" + BF16 attention and float linear layers" if bf16 else "")}


def _quantize_static(src: str, dst: str, nodes: list[str], ranges):
    """onnxruntime's QDQ placement with our ranges (symmetric, per-channel weights) → ModelProto."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    with tempfile.TemporaryDirectory(prefix=".int8-", dir=os.path.dirname(os.path.abspath(dst))) as tmp, \
            _quiet_preprocess_advice():
        cache = os.path.join(tmp, "ranges.json")
        save_tensors_data(ranges, cache)
        quantized = os.path.join(tmp, "qdq.onnx")
        quantize_static(src, quantized, None, quant_format=QuantFormat.QDQ, nodes_to_quantize=nodes,
                        op_types_to_quantize=["MatMul", "Gemm", "Conv"], per_channel=True, reduce_range=False,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=ranges.calibration_method, calibration_cache_path=cache,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       # an INT32 Q/DQ bias (a Conv's, e.g. DINOv2's patch embedding) does not
                                       # parse in TensorRT; it fuses a float bias itself
                                       "QuantizeBias": False})
        return onnx.load(quantized)


def to_int8_dynamic(src: str, dst: str, keep_nodes: tuple[str, ...] = (), keep_float: tuple[str, ...] = ()) -> dict:
    """The INT8 model for CPU runtimes: onnxruntime's dynamic quantization of the linear layers' MatMuls (INT8
    weights per output channel, activations quantized per tensor at run time, so no calibration data), which ONNX
    Runtime runs as integer MatMuls (VNNI where the CPU has it); everything else stays FP32. The head and the
    projections that feed it stay float, as in the TensorRT INT8 model."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(src, load_external_data=False)
    kept = head_feeding_linears(graph) | set(keep_nodes) | kept_by_keep_float(graph, keep_float)
    matmuls = {n.name for n in graph.graph.node if n.op_type == "MatMul"}
    nodes = [n for n in linear_nodes(graph) if n in matmuls and n not in kept]
    del graph
    with _quiet_preprocess_advice():
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True, nodes_to_quantize=nodes,
                         op_types_to_quantize=["MatMul"], extra_options={"MatMulConstBOnly": True})
    return {"quantized_nodes": len(nodes), "kept_float": list(keep_float), "kept_float_nodes": sorted(kept),
            "high_precision": precisions.REFERENCE.name,
            "tool": "onnxruntime.quantization.quantize_dynamic(MatMul, QInt8 weights per channel)"}


def keep_float_consumers(model, quantized: set[str]) -> int:
    """onnxruntime's QDQ pass feeds *every* consumer of a quantized activation from its DequantizeLinear, which
    would push the residual stream (Adds, LayerNorms, AA-CLIP's adapter mix) through INT8. Rewire every node that
    is not a quantized linear layer back to the float tensor (in place); returns how many inputs were restored."""
    producers = {o: n for n in model.graph.node for o in n.output}
    float_source = {}
    for dq in model.graph.node:
        q = producers.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear":
            float_source[dq.output[0]] = q.input[0]
    restored = 0
    for node in model.graph.node:
        if node.name in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            if name in float_source:
                node.input[i] = float_source[name]
                restored += 1
    return restored


def precision_gate(precision: str, fp32_path: str, candidate_path: str, data: np.ndarray, names: list[str],
                   batch: tuple[int, int], image_size: int, normals: np.ndarray | None = None,
                   rule: str = "map_max", reference=None, map_pearson_min: float | None = None) -> GateReport:
    """FP32 ONNX (CPU ONNX Runtime) vs the precision's ONNX on the verify images, held to that precision's limits.
    The candidate runs on ONNX Runtime's CPU provider, or, for a precision ONNX Runtime does not run (bf16), on the
    backend that runs it: a gate judges the file as it will be run. With ``normals`` (normal images), the OK/NG
    decisions at each side's own conformal threshold are compared too and decide instead of the score rank.
    ``reference``: the FP32 side to use instead of a fresh session (``gate_reference.RecordedReference``: a gate run
    again on images it has seen does not run them again). ``map_pearson_min``: a stricter map limit than the
    precision's own (--int8-map-min); it can only raise the limit."""
    import dataclasses

    from clipad.runtime import decision_check
    from clipad.runtime.compare import compare_runners

    from .onnx_export import INPUT_NAME, OUTPUT_NAMES, onnx_backend

    wanted = precisions.get(precision)
    if reference is None:
        reference = onnx_backend(fp32_path, image_size, batch)
    candidate = None

    def run_both(images: np.ndarray, image_names=None):
        """Both sides' per-image (map max, scores), and their comparison."""
        kept = {"ref": [], "cand": []}

        def keep(*outputs):
            for side, (maps, scores, *_) in zip(("ref", "cand"), outputs):   # the comparator has the features
                kept[side].append((maps.reshape(len(maps), maps.shape[1], -1).max(axis=2).astype(np.float64),
                                   np.asarray(scores, np.float64).reshape(len(scores), -1)))

        comparison = compare_runners(reference, candidate, images, image_names, on_outputs=keep)
        return comparison, *(tuple(np.concatenate(parts) for parts in zip(*kept[side])) for side in ("ref", "cand"))

    try:
        if wanted.why_not("onnxruntime") is None:
            candidate = onnx_backend(candidate_path, image_size, batch, precision)
        elif wanted.why_not("openvino") is None:
            from clipad.runtime.backends.openvino import OpenVINOBackend

            candidate = OpenVINOBackend.for_file(candidate_path, precision, image_size, batch, INPUT_NAME,
                                                 list(OUTPUT_NAMES))
        else:
            raise ClipadError(f"internal error: no backend here runs the {precision} gate")
        comparison, verify_ref, verify_cand = run_both(data, list(names))
        decision = None
        if normals is not None and len(normals):
            _, normal_ref, normal_cand = run_both(normals)
            decision = decision_check.check(rule, normal_ref, normal_cand, verify_ref, verify_cand,
                                            comparison.score_spearman, verify_names=list(names))
    except ClipadError as exc:
        raise ClipadError(f"the {precision} accuracy gate cannot run here: {exc}") from None
    finally:
        reference.close()
        if candidate is not None:
            candidate.close()
    limits = wanted.gate
    if map_pearson_min is not None and map_pearson_min > (limits.map_pearson_min or 0.0):
        limits = dataclasses.replace(limits, map_pearson_min=map_pearson_min)
    if decision is not None and decision.evaluated:
        limits = dataclasses.replace(limits, score_spearman_min=None, **DECISION_LIMITS)
    return gate(comparison, limits, precision, f"onnxruntime {precisions.REFERENCE.name}", candidate.description,
                decision)


# With normal images the gate judges OK/NG: no flip on held-back normal images at α = 5 % and 10 %, and ≥ 99 % equal
# decisions on the verify images; the score rank (Spearman) is then reported with its interval but does not decide.
DECISION_LIMITS = {"decision_flips_max": 0, "decision_agreement_min": 0.99}
