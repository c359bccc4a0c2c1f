"""The command-line options every command that runs an exported model shares (edge-detect, edge-calibrate,
edge-eval), so they mean the same everywhere, and the one call that opens the model from them."""
from __future__ import annotations

import argparse
import os

from .errors import ClipadError


def add_model_options(ap: argparse.ArgumentParser, triton: bool = False) -> None:
    """--model, --backend, --precision, --threads, --device (and --triton, --triton-model, --grpc)."""
    ap.add_argument("--model", required=not triton, metavar="DIR",
                    help="directory written by export-engine" + (" (not needed with --triton)" if triton else ""))
    ap.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "onnxruntime", "openvino"],
                    help="inference backend (default auto: TensorRT engine for this GPU if any, else ONNX Runtime; "
                         "openvino: Intel CPUs, extra [openvino])")
    ap.add_argument("--precision", choices=["fp32", "fp16", "bf16", "int8", "int8-cpu"],
                    help="which model runs: ONNX Runtime runs model.<precision>.onnx (default fp32; int8 on a CPU "
                         "runs model.int8-cpu.onnx when the export has it), TensorRT the engine of that precision "
                         "(default: the best for this GPU: fp16, int8, fp32), OpenVINO fp32/bf16 on model.onnx or "
                         "the fp16/int8 files")
    ap.add_argument("--threads", type=int, help="CPU threads for ONNX Runtime")
    ap.add_argument("--device", type=int, default=0, metavar="N", help="TensorRT: GPU index (default 0)")
    if triton:
        ap.add_argument("--triton", metavar="URL", help="run the model on this Triton server (host:port; HTTP, or "
                                                        "gRPC with --grpc); pre/post-processing stay here")
        ap.add_argument("--triton-model", metavar="NAME", help="with --triton: the served model (the name given to "
                                                               "export-engine --triton-repo)")
        ap.add_argument("--grpc", action="store_true", help="with --triton: talk gRPC instead of HTTP")


def check_threads(threads: int | None) -> int | None:
    """None (the library's default) or 1 … the CPUs this process may use."""
    if threads is None:
        return None
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not 1 <= threads <= available:
        raise ClipadError(f"--threads {threads}: must be between 1 and {available} (the CPUs this process may use)")
    return threads


def open_detector(args, **extra):
    """The Detector the options above ask for (``extra``: backend-specific options such as cuda_graph)."""
    from .detector import Detector

    check_threads(args.threads)
    if getattr(args, "triton", None) or getattr(args, "triton_model", None):
        if not (args.triton and args.triton_model):
            raise ClipadError("--triton URL and --triton-model NAME go together")
        if args.backend not in ("auto", "triton") or args.precision:
            raise ClipadError("--triton: the server decides backend and precision (set them with export-engine "
                              "--triton-repo); drop --backend/--precision")
        return Detector.open(args.model, backend="triton", triton_url=args.triton, triton_model=args.triton_model,
                             grpc=args.grpc)
    if not args.model:
        raise ClipadError("--model DIR is required (or --triton URL --triton-model NAME)")
    if args.device is not None and args.device < 0:
        raise ClipadError(f"--device {args.device}: a GPU index 0, 1, …")
    return Detector.open(args.model, backend=args.backend, precision=args.precision, threads=args.threads,
                         device=args.device, **extra)
