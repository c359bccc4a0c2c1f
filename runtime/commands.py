"""What every command shares: the runner (one-line errors, exit codes, Ctrl-C and SIGTERM), logging, and the options
of the commands that run an exported model (edge-detect, edge-calibrate, edge-eval), so they mean the same
everywhere. Choices come from the precision and backend registries."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Callable

from . import precisions
from .backends import registry
from .errors import ClipadError, Terminated
from .extras import missing_module_message

EXIT_OK, EXIT_NO_INPUT, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


def _terminate(signum, frame):
    raise Terminated()


def run_cli(prog: str, action: Callable[[], int], quiet: bool = False, interrupted: str = "interrupted") -> int:
    """Run a command: a ClipadError becomes one line on stderr and exit 2, Ctrl-C 130, SIGTERM 143 (after the same
    cleanup as Ctrl-C)."""
    setup_logging(quiet)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return action()
    except ClipadError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        hint = missing_module_message(exc.name)
        if hint is None:
            raise
        print(f"{prog}: error: {hint}", file=sys.stderr)
        return EXIT_USAGE
    except Terminated:
        rest = interrupted.split("; ", 1)[1] if "; " in interrupted else ""
        print(f"{prog}: terminated" + (f"; {rest}" if rest else ""), file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def setup_logging(quiet: bool) -> None:
    """Our messages on stderr at INFO (WARNING with --quiet); libraries stay at WARNING so their chatter stays out."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("clipad").setLevel(logging.WARNING if quiet else logging.INFO)


def add_model_options(ap: argparse.ArgumentParser, triton: bool = False) -> None:
    """--model, --backend, --precision, --threads, --device (and --triton, --triton-model, --grpc)."""
    ap.add_argument("--model", required=not triton, metavar="DIR",
                    help="directory written by export-engine" + (" (not needed with --triton)" if triton else ""))
    ap.add_argument("--backend", default=registry.AUTO, choices=list(registry.EDGE_CHOICES),
                    help="inference backend (default auto: a TensorRT engine for this GPU if any, else ONNX "
                         "Runtime; best: the fastest gate-passing backend and precision edge-bench --save-choice "
                         "measured on this machine); "
                         + "; ".join(f"{b.name}: {b.summary}" for b in registry.BACKENDS.values()
                                     if b.edge and not b.remote))
    ap.add_argument("--precision", choices=list(precisions.NAMES),
                    help="which model runs (default: ONNX Runtime and OpenVINO the FP32 export, TensorRT the best "
                         "engine for this GPU). " + precisions.help_text()
                         + ". On a CPU, ONNX Runtime runs a precision's CPU file when the export has one")
    ap.add_argument("--threads", type=int, help="CPU threads for ONNX Runtime / OpenVINO")
    ap.add_argument("--device", type=int, metavar="N", help="GPU index for TensorRT and ONNX Runtime's GPU "
                                                            "providers (default 0)")
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


def model_options(args: argparse.Namespace, **extra) -> tuple[str | None, str, dict]:
    """(model folder, backend name, backend options) from the options above; ``extra``: backend-specific options
    such as cuda_graph (None means "not given")."""
    check_threads(args.threads)
    if args.device is not None and args.device < 0:
        raise ClipadError(f"--device {args.device}: a GPU index 0, 1, …")
    if getattr(args, "triton", None) or getattr(args, "triton_model", None):
        if not (args.triton and args.triton_model):
            raise ClipadError("--triton URL and --triton-model NAME go together")
        given = [flag for flag, value in (("--backend", args.backend != registry.AUTO), ("--precision",
                 args.precision), ("--threads", args.threads), ("--device", args.device), ("--model", args.model))
                 if value] + [registry.flag(k) for k, v in extra.items() if v]
        if given:
            raise ClipadError(f"--triton: the server decides what runs and describes the model (set it with "
                              f"export-engine --triton-repo); drop {', '.join(given)}")
        return None, "triton", {"triton_url": args.triton, "triton_model": args.triton_model, "grpc": args.grpc}
    if not args.model:
        raise ClipadError("--model DIR is required (or --triton URL --triton-model NAME)")
    return args.model, args.backend, {"precision": args.precision, "threads": args.threads, "device": args.device,
                                      **extra}


def open_detector(args: argparse.Namespace, memory: bool = True, **extra):
    """The Detector the options above ask for (``memory`` False: without the calibration's few-shot memory)."""
    from .detector import Detector

    model_dir, backend, options = model_options(args, **extra)
    return Detector.open(model_dir, backend=backend, memory=memory, **options)
