"""The INT8 Q/DQ file placed and calibrated by NNCF (OpenVINO's quantizer, ONNX backend) instead of onnxruntime's
``quantize_static``: ``export-engine --precision int8 --int8-quantizer nncf``. Same policy as ours: only the linear
layers' inputs are quantized (NNCF's ignored scope is everything else, the head and the projections into it), the
remainder is made FP16 with the FP32 keep-list when ``--int8-high-precision fp16``. NNCF brings its own activation
range estimators and fast bias correction. Its SmoothQuant stays off: NNCF 3.4 applies it to every MatMul with a
constant weight, ignoring the ignored scope, so it would rescale the head's anchor products and the layers kept float
and put an unscoped ``Mul`` (which the FP16 remainder would make FP16) in front of the FP32 head. Whether the file
suits TensorRT (signed, symmetric, zero-point-free Q/DQ) is checked and recorded."""
from __future__ import annotations

import logging

import numpy as np

from clipad.runtime.errors import ClipadError

log = logging.getLogger("clipad")
# Op types NNCF may quantize in a transformer besides the linear layers; ignored so only our linear layers are.
OTHER_QUANTIZABLE = ["Add", "Sub", "Mul", "Div", "Concat", "ReduceMean", "Resize", "Softmax", "LayerNormalization",
                     "MaxPool", "AveragePool", "GlobalAveragePool", "Transpose", "Reshape", "Gather", "Pow", "Sqrt"]


def available() -> str | None:
    """None when NNCF imports, else the one-line reason."""
    try:
        import nncf  # noqa: F401
    except ImportError:
        return "--int8-quantizer nncf needs NNCF: pip install nncf (or clipad-edge[export])"
    return None


def tensorrt_compatible(model) -> tuple[bool, str]:
    """TensorRT's explicit quantization takes signed INT8, symmetric (zero point 0) Q/DQ only (no INT32 bias)."""
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        quantized = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if quantized is not None and quantized.data_type != TensorProto.INT8:
            return False, f"{node.name}: dequantizes {TensorProto.DataType.Name(quantized.data_type)} (a quantized " \
                          "bias?); TensorRT takes INT8 Q/DQ"
        if node.op_type == "QuantizeLinear" and (len(node.input) < 3 or not node.input[2]):
            return False, f"{node.name}: no zero point (UINT8 by default)"
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = inits.get(node.input[2])
            if zp is None:
                continue
            if zp.data_type != TensorProto.INT8:
                return False, f"{node.name}: zero point of type {TensorProto.DataType.Name(zp.data_type)}"
            if np.any(numpy_helper.to_array(zp) != 0):
                return False, f"{node.name}: non-zero zero point (asymmetric)"
    return True, "signed symmetric Q/DQ"


def quantize(src: str, calib: np.ndarray, batch: int, quantize_nodes: list[str]):
    """NNCF post-training quantization of ``quantize_nodes`` (and nothing else); returns the ONNX ModelProto."""
    import nncf
    import onnx

    from .onnx_graph import INPUT_NAME

    why = available()
    if why:
        raise ClipadError(why)
    model = onnx.load(src)
    wanted = set(quantize_nodes)
    others = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and n.name not in wanted]
    from clipad.runtime.batching import chunks

    batches = [chunk for chunk, _ in chunks(calib, batch, batch)]
    dataset = nncf.Dataset(batches, lambda b: {INPUT_NAME: b})
    for name in ("nncf", "nncf.common"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                           AdvancedSmoothQuantParameters)

        no_smoothing = AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=-1, matmul=-1))
        return nncf.quantize(model, dataset, preset=nncf.QuantizationPreset.PERFORMANCE,
                             model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib),
                             ignored_scope=nncf.IgnoredScope(names=others, types=OTHER_QUANTIZABLE, validate=False),
                             advanced_parameters=no_smoothing)
    except Exception as exc:  # NNCF raises many types; the message is what matters
        raise ClipadError(f"NNCF quantization failed: {str(exc).strip().splitlines()[0][:300]}") from exc
