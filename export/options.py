"""What ``export-engine`` was asked to do, as typed values: the command line fills these, the orchestrator
(``pipeline``) reads them, and hands each step only the explicit parameters it needs."""
from __future__ import annotations

from dataclasses import dataclass, field

from clipad.runtime import precisions
from clipad.runtime.errors import ClipadError

# Who places and calibrates the static Q/DQ of the INT8 file (--int8-quantizer); the first is the default.
QUANTIZERS = ("onnxruntime", "nncf", "modelopt")


@dataclass
class CalibrationOptions:
    data: str | None = None            # folder of normal images (INT8)
    method: str = "minmax"
    high_precision: str = precisions.INT8_REMAINDERS[0]   # type of everything that is not a quantized linear layer
    keep_float: tuple[str, ...] = ()   # module-path scopes whose linear layers stay float
    quantizer: str = QUANTIZERS[0]
    smooth_alpha: float | None = None  # SmoothQuant's α for the Q/DQ file (None: off)
    shift: bool = False                # centre lopsided linear-layer inputs (GELU outputs) of the Q/DQ file
    sensitivity: bool = True           # a failed INT8 gate: keep the most decision-sensitive layers float, try again
    map_min: float | None = None       # INT8 gate's map Pearson limit raised to this (--int8-map-min)


@dataclass
class EngineOptions:
    build: bool = True                 # False: --no-engine
    flavor: str = "auto"
    compute_capability: str | None = None
    workspace_gb: float = 4.0
    timing_cache: str | None = None
    version_compatible: bool = False
    device: int = 0                    # GPU index to build on (full TensorRT, or TensorRT-RTX for a local GPU)


@dataclass
class TritonOptions:
    repo: str                          # the Triton model repository to write into
    name: str | None = None            # model name (default: the export folder's name)
    flavor: str = "auto"               # tensorrt, onnxruntime, python, auto
    accelerator: str = "none"          # onnxruntime flavor: none, tensorrt, openvino
    engine: str | None = None          # tensorrt flavor: which listed engine
    instances: int = 1
    max_queue_delay_us: int = 2000
    max_batch: int | None = None       # python flavor: largest batch Triton gathers


@dataclass
class ModelOptions:
    kind: str
    ckpt: str | None = None
    epoch: int | None = None
    clip_weights: str | None = None
    random_init: bool = False
    seed: int = 0
    arch: str = "ViT-L-14-336"
    image_size: int = 518
    class_names: list[str] | None = None
    dataset: str | None = None
    domain: str | None = None
    quick_gelu: bool | None = None
    dino_weights: str | None = None        # Crane+: DINOv2 ViT-B/14-reg4 state dict
    memory_features: bool = False          # a patch_features output and fewshot.onnx (few-shot memory)


@dataclass
class ExportOptions:
    output: str                                   # the export folder (--output, or the --from-onnx folder)
    model: ModelOptions | None = None             # None: work on the existing export in ``output``
    batch: tuple[int, int] = (1, 1)
    verify_images: str | None = None
    precision: str = precisions.REFERENCE.name
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    accept_accuracy_loss: bool = False
    engine: EngineOptions = field(default_factory=EngineOptions)
    triton: TritonOptions | None = None           # also write the export into a Triton model repository
    threads: int | None = None                    # torch threads


def parse_batch(batch: int | None, dynamic: str | None) -> tuple[int, int]:
    """--batch N or --dynamic-batch MIN:MAX → (min, max)."""
    if dynamic:
        try:
            lo, hi = (int(v) for v in dynamic.split(":"))
        except ValueError:
            raise ClipadError(f"--dynamic-batch {dynamic!r}: expected MIN:MAX, e.g. 1:8") from None
        if not 1 <= lo < hi:
            raise ClipadError(f"--dynamic-batch {dynamic}: need 1 <= MIN < MAX")
        return lo, hi
    n = 1 if batch is None else batch
    if n < 1:
        raise ClipadError(f"--batch {n}: must be at least 1")
    return n, n
