"""Where ONNX Runtime's CPU time goes for one exported model: each operator type's share of an inference (ONNX
Runtime's own profiler), the rate its MatMul/Gemm kernels reach, and the rate of a plain float32 matrix product of
the same shape on this CPU (numpy's BLAS), so a slow run can be told apart from a slow machine.

``python -m clipad.benchmarks.ort_profile --model DIR [--precision fp32] [--runs 2] [--threads N] [--json F]``
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np

from clipad.runtime import precisions
from clipad.runtime.commands import run_cli
from clipad.runtime.errors import ClipadError

MATMUL_OPS = ("MatMul", "Gemm", "FusedMatMul", "DynamicQuantizeMatMul", "MatMulInteger", "QLinearMatMul")


def matmul_flops(args: dict) -> float:
    """2·K per output element of A[..., M, K] @ B[..., K, N], from a profiled node's shapes (prepacked weights are
    not listed among its inputs, so K comes from A and the rest from the output)."""
    shapes = [list(next(iter(s.values()))) for key in ("input_type_shape", "output_type_shape")
              for s in args.get(key, [])[:1] if s]
    if len(shapes) < 2 or not shapes[0]:
        return 0.0
    return 2.0 * shapes[0][-1] * float(np.prod(shapes[1]))


def summarize(events: list[dict], runs: int) -> dict:
    """Per-op-type milliseconds per run over the last ``runs`` model runs of an ONNX Runtime profile."""
    model_runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])[-runs:]
    if len(model_runs) < runs:
        raise ClipadError(f"the profile holds {len(model_runs)} model runs, {runs} expected")
    windows = [(r["ts"], r["ts"] + r["dur"]) for r in model_runs]
    per_op, calls, flops = defaultdict(float), defaultdict(int), defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not any(lo <= e["ts"] <= hi for lo, hi in windows):
            continue
        op = e.get("args", {}).get("op_name", "?")
        per_op[op] += e["dur"] / 1000.0 / runs
        calls[op] += 1
        if op in MATMUL_OPS:
            flops[op] += matmul_flops(e["args"]) / runs
    run_ms = float(np.median([r["dur"] / 1000.0 for r in model_runs]))
    kernels = sum(per_op.values())
    ops = [{"op": op, "ms": round(ms, 2), "share": round(ms / kernels, 4), "calls": calls[op] // runs,
            "gflops": float(f"{flops[op] / 1e9:.4g}") if op in flops else None,
            "gflop_per_s": round(flops[op] / 1e9 / (ms / 1000.0), 1) if flops.get(op) and ms > 0 else None}
           for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])]
    return {"run_ms": round(run_ms, 1), "kernels_ms": round(kernels, 1), "ops": ops}


def blas_rate(m: int = 1370, k: int = 1024, n: int = 4096, repeat: int = 5) -> float:
    """GFLOP/s of numpy's float32 matrix product at a ViT-L MLP shape (tokens × width × 4·width)."""
    rng = np.random.default_rng(0)
    a, b = rng.random((m, k), dtype=np.float32), rng.random((k, n), dtype=np.float32)
    a @ b
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2.0 * m * k * n / float(np.median(times)) / 1e9


def profile(model_dir: str, precision: str, runs: int, threads: int | None) -> dict:
    import onnxruntime as ort

    from clipad.runtime.backends.onnxruntime import CPU, OnnxRuntimeBackend
    from clipad.runtime.manifest import Manifest

    manifest = Manifest.read(model_dir)
    with tempfile.TemporaryDirectory(prefix="clipad-profile-") as tmp:
        backend = OnnxRuntimeBackend.open(model_dir, manifest, precision=precision, providers=[CPU], threads=threads,
                                          profile_prefix=os.path.join(tmp, "ort"))
        name = os.path.basename(backend.path)
        s, lo = manifest.image_size, backend.batch_range[0]
        batch = np.random.default_rng(0).integers(0, 256, (lo, s, s, 3), dtype=np.uint8)
        for _ in range(runs + 1):   # the first run is a warm-up, left out of the summary
            backend.run(batch)
        with open(backend.end_profiling()) as fh:
            events = json.load(fh)
        backend.close()
    report = summarize(events, runs)
    report.update(model=model_dir, file=name, batch=lo, threads=threads or "onnxruntime default",
                  onnxruntime=ort.__version__, blas_gflop_per_s=round(blas_rate(), 1))
    return report


def render(report: dict, top: int = 12) -> str:
    lines = [f"{report['file']} (batch {report['batch']}, threads {report['threads']}, onnxruntime "
             f"{report['onnxruntime']}): {report['run_ms']:.0f} ms per run, kernels {report['kernels_ms']:.0f} ms",
             "| op | ms per run | share | calls | GFLOP | GFLOP/s |", "|---|---|---|---|---|---|"]
    for o in report["ops"][:top]:
        lines.append(f"| {o['op']} | {o['ms']:.1f} | {100 * o['share']:.1f} % | {o['calls']} | "
                     f"{'' if o['gflops'] is None else o['gflops']} | "
                     f"{'' if o['gflop_per_s'] is None else o['gflop_per_s']} |")
    lines.append(f"numpy float32 matrix product 1370×1024 @ 1024×4096 on this CPU: "
                 f"{report['blas_gflop_per_s']:.0f} GFLOP/s")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clipad.benchmarks.ort_profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, metavar="DIR", help="directory written by export-engine")
    ap.add_argument("--precision", default=precisions.REFERENCE.name,
                    choices=[p for p in precisions.NAMES if not precisions.get(p).why_not("onnxruntime")])
    ap.add_argument("--runs", type=int, default=2, help="profiled runs after one warm-up (default 2)")
    ap.add_argument("--threads", type=int, help="intra-op threads (default: ONNX Runtime's)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    args = ap.parse_args(argv)

    def go() -> int:
        from clipad.runtime.commands import check_threads
        from clipad.runtime.files import probe_file, refuse_reports_over

        if args.runs < 1:
            raise ClipadError(f"--runs {args.runs}: at least 1")
        check_threads(args.threads)

        refuse_reports_over({"--json": args.json}, args.model)
        probe_file(args.json, "--json")
        report = profile(args.model, args.precision, args.runs, args.threads)
        print(render(report))
        if args.json:
            from clipad.runtime.atomic import write_json_atomic

            write_json_atomic(args.json, report)
        return 0

    return run_cli("ort_profile", go, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
