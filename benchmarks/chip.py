"""How far each edge-bench row is from the chip: the model's matrix-product work per image (from the ONNX graph) and
this machine's measured matrix-product rate per data type, with each backend's own library.

The ceiling is one ViT-L MLP-shaped product ([1370, 1024] × [1024, 4096], 11.5 GFLOP) run repeatedly: numpy's BLAS
(torch and the reference), ONNX Runtime and OpenVINO in FP32, OpenVINO on BF16 operands (the BF16 file's pattern),
ONNX Runtime's dynamic INT8 MatMul (the ``int8-cpu`` file's kernel), OpenVINO on an INT8 weight with the activation
quantized at run time (``int8-dyn-bf16``'s), and ONNX Runtime and OpenVINO on the product in the Q/DQ file's pattern
(symmetric per-tensor INT8 activation, per-channel INT8 weight, FP32 out). A row's fraction is its achieved rate
(model GFLOP / inference time) over the ceiling of the library and data type it ran;
layers that are not matrix products count as time but not as work, so no row reaches 1.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time

import numpy as np

log = logging.getLogger("clipad")
SHAPE = (1370, 1024, 4096)   # tokens of ViT-L/14 at 518 px, width, MLP width
DATA_TYPE = {"bfloat16": "bf16", "dynamic-int8": "int8 (dynamic)", "weight-int8": "int8 (dynamic)",
             "static-qdq": "int8 (Q/DQ)"}   # by conversion


def ceiling_key(backend: str, precision: str) -> str | None:
    """The ceiling a row is measured against: its library and the data type its products run in."""
    from clipad.runtime import precisions

    record = precisions.get(precision)
    kind = record.name if record.reference else DATA_TYPE.get(record.conversion)
    if kind is None:
        return None
    if backend == "torch":   # torch's FP32 products use the same BLAS class as numpy's; BF16 needs torch itself
        return f"{'numpy' if record.reference else 'torch'} {kind}"
    return f"{backend} {kind}"


def model_gflop(onnx_path: str) -> float | None:
    """Matrix-product GFLOP per image (MatMul, Gemm, Conv) from the graph with the batch fixed to 1; None when onnx
    is not installed or shapes cannot be inferred."""
    try:
        import onnx
        from onnx import shape_inference
    except ImportError:
        return None
    try:
        model = onnx.load(onnx_path)
        for value in model.graph.input:   # the batch: the first dimension, when it is not fixed
            for dim in value.type.tensor_type.shape.dim[:1]:
                if not dim.dim_value:
                    dim.Clear()
                    dim.dim_value = 1
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # a graph onnx's shape inference cannot follow: the column stays empty
        log.info("model GFLOP not computable (%s)", str(exc).splitlines()[0][:120])
        return None
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    shapes.update((t.name, list(t.dims)) for t in inferred.graph.initializer)
    total = 0.0
    for node in inferred.graph.node:
        out = shapes.get(node.output[0])
        if not out or not all(out):
            continue
        if node.op_type in ("MatMul", "Gemm"):
            a = shapes.get(node.input[0])
            if a and a[-1]:
                k = a[-2] if node.op_type == "Gemm" and any(x.name == "transA" and x.i for x in node.attribute) \
                    else a[-1]
                total += 2.0 * float(np.prod(out)) * k
        elif node.op_type == "Conv":
            w = shapes.get(node.input[1])
            if w:
                total += 2.0 * float(np.prod(out)) * float(np.prod(w[1:]))
    return total / 1e9 if total else None


def _rate(run, flop: float, repeats: int = 5) -> float:
    run()   # warm-up (and first-call setup)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return flop / float(np.median(times)) / 1e9


def _matmul_onnx(path: str, weight: np.ndarray, bf16: bool) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m, k, n = SHAPE
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "ceiling",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if bf16:   # the BF16 file's own pattern: BF16 weight and operand, FP32 out
        from clipad.export.convert_bf16 import bf16_products

        bf16_products(model)
    onnx.save(model, path)


def _qdq_matmul_onnx(path: str, weight: np.ndarray, activation_range: float) -> None:
    """The INT8 Q/DQ file's pattern (``export.convert.to_int8``): the activation quantized per tensor, the weight
    stored INT8 with one scale per output channel, both zero points 0 (TensorRT's symmetric INT8)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from clipad.export.convert_weight_int8 import int8_per_channel

    m, k, n = SHAPE
    w_int8, w_scale = int8_per_channel(weight)
    constants = [numpy_helper.from_array(w_int8, "w_q"), numpy_helper.from_array(w_scale, "w_scale"),
                 numpy_helper.from_array(np.zeros(n, np.int8), "w_zero"),
                 numpy_helper.from_array(np.array(activation_range / 127, np.float32), "x_scale"),
                 numpy_helper.from_array(np.array(0, np.int8), "x_zero")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], name="q"),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], name="dq"),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], name="w_dq", axis=1),
             helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "ceiling-qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], constants)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), path)


def _weight_int8_matmul_onnx(path: str, weight: np.ndarray) -> None:
    """The ``int8-dyn-bf16`` file's pattern: the weight stored INT8 behind a DequantizeLinear, the activation FP32
    (OpenVINO quantizes it at run time)."""
    import onnx

    from clipad.export.convert_weight_int8 import dequantized_weights

    _matmul_onnx(path, weight, bf16=False)
    model = onnx.load(path)
    dequantized_weights(model, ["mm"])
    onnx.save(model, path)


def ceilings(threads: int | None = None, backends: tuple[str, ...] = ("torch", "onnxruntime", "openvino")) -> dict:
    """GFLOP/s of one MLP-shaped product per library and data type; a library that is missing is left out."""
    m, k, n = SHAPE
    flop = 2.0 * m * k * n
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = (rng.standard_normal((k, n), dtype=np.float32) / 32).astype(np.float32)
    out = {}
    if "torch" in backends:
        out["numpy fp32"] = _rate(lambda: x @ w, flop)
        try:
            import torch

            xb, wb = torch.from_numpy(x).bfloat16(), torch.from_numpy(w).bfloat16()
            with torch.no_grad():
                out["torch bf16"] = _rate(lambda: xb @ wb, flop)
        except ImportError:
            pass
    with tempfile.TemporaryDirectory(prefix="clipad-ceiling-") as tmp:
        try:
            import onnx  # noqa: F401  (writing the probe models)
        except ImportError:
            return out
        fp32_path, bf16_path = os.path.join(tmp, "mm.onnx"), os.path.join(tmp, "mm.bf16.onnx")
        qdq_path = os.path.join(tmp, "mm.qdq.onnx")
        _matmul_onnx(fp32_path, w, bf16=False)
        _qdq_matmul_onnx(qdq_path, w, float(np.abs(x).max()))
        if "onnxruntime" in backends:
            try:
                import onnxruntime as ort
                from onnxruntime.quantization import QuantType, quantize_dynamic

                options = ort.SessionOptions()
                if threads:
                    options.intra_op_num_threads = threads
                session = ort.InferenceSession(fp32_path, options, providers=["CPUExecutionProvider"])
                out["onnxruntime fp32"] = _rate(lambda: session.run(None, {"x": x}), flop)
                int8_path = os.path.join(tmp, "mm.int8.onnx")
                from clipad.export.convert import _quiet_preprocess_advice

                with _quiet_preprocess_advice():
                    quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8, per_channel=True)
                session = ort.InferenceSession(int8_path, options, providers=["CPUExecutionProvider"])
                out["onnxruntime int8 (dynamic)"] = _rate(lambda: session.run(None, {"x": x}), flop)
                session = ort.InferenceSession(qdq_path, options, providers=["CPUExecutionProvider"])
                out["onnxruntime int8 (Q/DQ)"] = _rate(lambda: session.run(None, {"x": x}), flop)
            except ImportError:
                pass
        if "openvino" in backends:
            try:
                import openvino as ov
            except ImportError:
                return out
            core = ov.Core()
            config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
            if threads:
                config["INFERENCE_NUM_THREADS"] = int(threads)
            request = core.compile_model(fp32_path, "CPU", config).create_infer_request()
            out["openvino fp32"] = _rate(lambda: request.infer({0: x}), flop)
            if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
                _matmul_onnx(bf16_path, w, bf16=True)
                request = core.compile_model(bf16_path, "CPU", config).create_infer_request()
                out["openvino bf16"] = _rate(lambda: request.infer({0: x}), flop)
            if "INT8" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
                request = core.compile_model(qdq_path, "CPU", config).create_infer_request()
                out["openvino int8 (Q/DQ)"] = _rate(lambda: request.infer({0: x}), flop)
                from clipad.runtime.precisions import DYNAMIC_GROUP

                weight_path = os.path.join(tmp, "mm.int8w.onnx")
                _weight_int8_matmul_onnx(weight_path, w)
                request = core.compile_model(weight_path, "CPU", {**config, "DYNAMIC_QUANTIZATION_GROUP_SIZE":
                                                                  DYNAMIC_GROUP}).create_infer_request()
                out["openvino int8 (dynamic)"] = _rate(lambda: request.infer({0: x}), flop)
    return {key: round(value, 1) for key, value in out.items()}


def annotate(rows: list[dict], gflop: float | None, rates: dict) -> None:
    """Add ``gflops`` (achieved, inference only) and ``of_ceiling`` to each row that ran."""
    for r in rows:
        r["gflops"] = r["of_ceiling"] = None
        if r["status"] != "ok" or not gflop or not r["stages_ms"].get("infer"):
            continue
        r["gflops"] = round(gflop / (r["stages_ms"]["infer"] / 1e3), 1)
        ceiling = rates.get(ceiling_key(r["backend"], r["runs"] or r["precision"]) or "")
        r["of_ceiling"] = round(r["gflops"] / ceiling, 3) if ceiling else None
