"""torch → ONNX (opset 18, explicit-matmul attention, single LayerNormalization nodes) and the parity gate
(torch reference vs ONNX Runtime through the one comparator, ``clipad.runtime.compare``).

torch is imported only where a torch model is exported or run: ``onnx_backend`` and the constants serve the
torch-free ``--from-onnx`` path too."""
from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

import numpy as np

from clipad.runtime import precisions
from clipad.runtime.compare import PARITY_LIMITS, GateReport, compare_runners, gate
from clipad.runtime.errors import ClipadError

from .onnx_graph import INPUT_NAME, MEMORY_FEATURES, OUTPUT_NAMES  # noqa: F401  (the graph's names, imported here too)
from .onnx_graph import fold_constant_weight_reads

if TYPE_CHECKING:
    from .models.factory import BuiltDetector

log = logging.getLogger("clipad")
OPSET = 18


def export_onnx(built: BuiltDetector, path: str, batch_min: int, batch_max: int) -> None:
    """Write ``built.module`` as ONNX: uint8 NHWC input, float32 outputs, batch fixed or dynamic in [min, max]."""
    import torch

    size = built.image_size
    example = torch.zeros(batch_max if batch_min == batch_max else max(2, batch_min), size, size, 3,
                          dtype=torch.uint8)
    dynamic = None
    if batch_min != batch_max:
        batch = torch.export.Dim("batch", min=batch_min, max=batch_max)
        dynamic = ({0: batch},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(built.module, (example,), dynamo=True, opset_version=OPSET,
                                        input_names=[INPUT_NAME], output_names=output_names(built),
                                        dynamic_shapes=dynamic, optimize=True, verbose=False)
        except Exception as exc:  # the exporter raises many types; the message is what matters
            raise ClipadError(f"ONNX export failed: {str(exc).strip().splitlines()[0][:300]}") from exc
    program.save(path, external_data=False)
    fold_weight_reads(path)
    check_graph(path)


def fold_weight_reads(path: str) -> int:
    """Fold the exporter's leftover Transposes/Gathers of weights into constants (``fold_constant_weight_reads``),
    rewriting ``path`` when there were any."""
    import onnx

    model = onnx.load(path)
    folded = fold_constant_weight_reads(model)
    if folded:
        onnx.save(model, path)
    return folded


def output_names(built: BuiltDetector) -> list[str]:
    return list(OUTPUT_NAMES) + ([MEMORY_FEATURES] if built.module.memory_features else [])


def output_shapes(path: str) -> dict[str, list]:
    """Each graph output's dimensions (a name for a dynamic one), read without the weights' external data."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    return {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output}


def check_graph(path: str) -> None:
    """The deployment rules the graph must follow (TensorRT 10.3 … 11.x)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    ops = {n.op_type for n in model.graph.node}
    for fn in model.functions:
        ops |= {n.op_type for n in fn.node}
    bad = ops & {"Attention", "If", "Loop", "Scan"}
    if bad or not 17 <= opset <= 20:
        raise ClipadError(f"exported graph breaks TensorRT rules: opset {opset}, ops {sorted(bad)}")


def onnx_backend(path: str, image_size: int, batch: tuple[int, int], precision: str | None = None):
    """ONNX Runtime (CPU) on an ONNX file that has no manifest yet (the export's gates), as a ``Backend``."""
    from clipad.runtime.backends.onnxruntime import CPU, OnnxRuntimeBackend

    return OnnxRuntimeBackend(path, image_size=image_size, batch_range=batch,
                              precision=precision or precisions.REFERENCE.name, input_name=INPUT_NAME,
                              output_names=None, providers=[CPU])


def parity_gate(built: BuiltDetector, onnx_path: str, data: np.ndarray, names: list[str],
                batch: tuple[int, int]) -> GateReport:
    """Torch reference vs ONNX Runtime (CPU) on the verify images, held to the parity limits; for a graph with
    Crane+'s D-Attn that fails, again with the entries within float32 rounding of its threshold pinned
    (``dattn_band``)."""
    from . import dattn_band
    from .reference import TorchBackend

    reference = TorchBackend(built)
    candidate = onnx_backend(onnx_path, built.image_size, batch)
    try:
        comparison = compare_runners(reference, candidate, data, names)
    finally:
        candidate.close()
    report = gate(comparison, PARITY_LIMITS, "parity", "torch", "onnxruntime CPUExecutionProvider")
    if not report.passed and dattn_band.has_dattn(onnx_path):
        log.info("      parity: %s; D-Attn's hard threshold is in the graph: comparing again with the entries "
                 "within float32 rounding of it pinned", "; ".join(report.failures))
        report = dattn_band.pinned_parity(built, onnx_path, data, names, batch, report)
    return report
