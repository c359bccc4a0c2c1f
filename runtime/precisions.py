"""Every precision clipad-edge knows, as data. Command-line choices, model file names, gate limits, which backend
runs what (and why not), CPU substitutes, engine preferences and the files a Triton repository ships all derive
from these records; no other module spells a precision's name.

Adding a precision is one record here (and, when ``export-engine`` makes its file, one converter in
``clipad.export.convert`` keyed by ``conversion``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .compare import GateLimits
from .errors import ClipadError


@dataclass(frozen=True)
class Precision:
    name: str
    file: str                          # the ONNX file it runs from, in the export folder
    summary: str                       # one line for --help
    gate: GateLimits | None = None     # accuracy gate against the FP32 reference; None: it is the reference
    conversion: str | None = None      # how export-engine makes ``file`` from model.onnx (None: it does not)
    needs_calibration_data: bool = False   # --calib-data is required to make it
    engine_rank: int | None = None     # TensorRT engines are built from it; lower ranks are preferred by ``auto``
    cpu_substitute: str | None = None  # on a CPU-only ONNX Runtime, this precision's file runs instead
    openvino_hint: str | None = None   # OpenVINO's INFERENCE_PRECISION_HINT when OpenVINO runs it
    cpu_capability: str | None = None  # an OpenVINO OPTIMIZATION_CAPABILITIES entry the CPU needs to run it as made
    min_compute_capability: float | None = None   # the oldest NVIDIA GPU generation whose engines run it
    only_on: tuple[str, ...] | None = None   # the backends that run it, when not every backend does
    int8_remainder: str | None = None  # a Q/DQ file's type for what is not quantized, when the precision fixes it
    # OpenVINO's DYNAMIC_QUANTIZATION_GROUP_SIZE: the file's INT8 weights (DequantizeLinear constants) run as INT8
    # products, the activations quantized per token in groups of this many input channels at run time
    openvino_dynamic_quantization: int | None = None
    not_run_by: dict[str, str] = field(default_factory=dict)   # backend -> why it cannot run this precision

    @property
    def builds_engine(self) -> bool:
        return self.engine_rank is not None

    @property
    def reference(self) -> bool:
        return self.gate is None

    def why_not(self, backend: str) -> str | None:
        """Why ``backend`` cannot run this precision, or None when it can. A plain ONNX file runs on every backend
        unless the record says otherwise, so a new backend needs no change here."""
        if backend in self.not_run_by:
            return self.not_run_by[backend]
        if self.only_on is not None and backend not in self.only_on:
            return f"{backend} does not run {self.name} ({self.summary}); it runs on {', '.join(self.only_on)}"
        return None


BF16_REMAINDER = "bf16"   # int8-bf16's remainder; not an --int8-high-precision choice (only OpenVINO runs it)
# divides every CLIP/DINOv2 width (768, 1024, 3072, 4096): OpenVINO leaves a layer whose input width it does not
# divide unquantized (AA-CLIP ViT-L@518, 2 cores: 256 and 1024 run alike, 4096 as slow as FP32; 32 is 25 % slower)
DYNAMIC_GROUP = 256
_INT8_GATE = GateLimits(map_pearson_min=0.99, score_spearman_min=0.98)
_FP16_GATE = GateLimits(map_pearson_min=0.999)

PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", "model.onnx", "the FP32 export, the reference of every gate", engine_rank=2,
              openvino_hint="f32"),
    Precision("fp16", "model.fp16.onnx", "mixed FP16/FP32 (LayerNorm, softmax, L2 norms and the head FP32)",
              gate=_FP16_GATE, conversion="float16", engine_rank=0, openvino_hint="f32"),
    Precision("bf16", "model.bf16.onnx", "BF16 matrix products, FP32 residual stream, LayerNorm, softmax, L2 norms "
              "and head (OpenVINO on CPUs with BF16; TensorRT on SM 8.0+)", gate=_FP16_GATE, conversion="bfloat16",
              engine_rank=3, openvino_hint="f32", cpu_capability="BF16", min_compute_capability=8.0,
              only_on=("openvino", "tensorrt", "torch"),   # torch: autocast(bfloat16), an edge-bench row
              not_run_by={"onnxruntime": "ONNX Runtime's CPU provider has no BF16 path (no BF16 MatMul); "
                                         "use openvino"}),
    Precision("int8", "model.int8.onnx", "explicit symmetric Q/DQ on the linear layers, FP16 remainder (TensorRT)",
              gate=_INT8_GATE, conversion="static-qdq", needs_calibration_data=True, engine_rank=1,
              cpu_substitute="int8-cpu", openvino_hint="f32",
              not_run_by={"torch": "the torch reference runs fp32 (and fp16 on CUDA)"}),
    Precision("int8-bf16", "model.int8-bf16.onnx", "int8's Q/DQ linear layers with BF16 attention and float linear "
              "layers, FP32 residual stream, LayerNorm and head (OpenVINO on CPUs with AVX512-BF16 or AMX)",
              gate=_INT8_GATE, conversion="static-qdq", needs_calibration_data=True, openvino_hint="f32",
              cpu_capability="BF16", only_on=("openvino",), int8_remainder=BF16_REMAINDER),
    Precision("int8-dyn-bf16", "model.int8-dyn-bf16.onnx", "INT8 weights, activations quantized per token at run "
              "time (no calibration), BF16 attention and float linear layers, FP32 residual stream, LayerNorm and head "
              "(OpenVINO on CPUs with AVX512-BF16 or AMX)", gate=_INT8_GATE, conversion="weight-int8",
              openvino_hint="f32", cpu_capability="BF16", only_on=("openvino",),
              openvino_dynamic_quantization=DYNAMIC_GROUP),
    Precision("int8-cpu", "model.int8-cpu.onnx", "dynamic INT8 linear layers, FP32 rest: the fast INT8 for ONNX "
              "Runtime on CPUs", gate=_INT8_GATE, conversion="dynamic-int8", only_on=("onnxruntime", "triton"),
              not_run_by={"openvino": "int8-cpu is onnxruntime's dynamic INT8 (DynamicQuantizeMatMul); OpenVINO runs "
                                      "the Q/DQ int8 model",
                          "tensorrt": "no TensorRT engine is built for int8-cpu (it is the CPU file)",
                          "torch": "the torch reference runs fp32 (and fp16 on CUDA)"}),
)}

REFERENCE = next(p for p in PRECISIONS.values() if p.reference)
INT8_REMAINDERS = ("fp16", "fp32")   # --int8-high-precision: what an int8 Q/DQ file leaves float; first: default
NAMES = tuple(PRECISIONS)
EXPORTABLE = tuple(p.name for p in PRECISIONS.values() if p.reference or p.conversion)   # export-engine --precision
ENGINE_PRECISIONS = tuple(sorted((p.name for p in PRECISIONS.values() if p.builds_engine),
                                 key=lambda n: PRECISIONS[n].engine_rank))


def get(name: str | None) -> Precision:
    """The record of ``name`` (None: the reference); a one-line error for an unknown name."""
    if name is None:
        return REFERENCE
    if name not in PRECISIONS:
        raise ClipadError(f"unknown precision {name!r}; choose one of {', '.join(NAMES)}")
    return PRECISIONS[name]


def file_precision(file_name: str) -> Precision | None:
    """The precision whose own file (made by export-engine) is ``file_name``; None for files of no precision."""
    return next((p for p in PRECISIONS.values() if p.file == file_name and (p.reference or p.conversion)), None)


def run_by(backend: str) -> tuple[str, ...]:
    """The precisions ``backend`` runs."""
    return tuple(p.name for p in PRECISIONS.values() if p.why_not(backend) is None)


def help_text() -> str:
    return "; ".join(f"{p.name}: {p.summary}" for p in PRECISIONS.values())
