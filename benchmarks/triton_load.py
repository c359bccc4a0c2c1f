"""Load test: the Triton pipeline (JPEG/PNG bytes in, map, score and label out) at several client concurrencies,
next to the local runtime on the same model and images (same work: decode, preprocess, infer, decide).

    python -m clipad.benchmarks.triton_load --model DIR --url localhost:8000 --triton-model NAME \\
        --source IMAGES [--concurrency 1,4,16] [--requests 64] [--json F] [--markdown F]

Start the server first (``edge-serve REPO``). Throughput is requests per second over the whole run; latency is per
request as the client sees it. The local rows run ``Detector.predict_batch`` in this process at batch 1 and at the
export's largest batch; the per-request overhead is served p50 at concurrency 1 minus local p50 at batch 1.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time

import numpy as np

from clipad.runtime.commands import run_cli


def percentile(values, q):
    return float(np.percentile(np.asarray(values) * 1e3, q))


def local_rows(model: str, blobs: list[bytes], requests: int) -> list[dict]:
    from clipad.runtime.detector import Detector

    rows = []
    with Detector.open(model, backend="onnxruntime") as det:
        det.predict(blobs[0])   # warm-up
        for batch in sorted({1, det.backend.batch_range[1]}):
            latencies, done, start = [], 0, time.perf_counter()
            while done < requests:
                chunk = [blobs[(done + i) % len(blobs)] for i in range(min(batch, requests - done))]
                t = time.perf_counter()
                det.predict_batch(chunk)
                latencies.append(time.perf_counter() - t)
                done += len(chunk)
            wall = time.perf_counter() - start
            rows.append({"path": "local", "batch": batch, "concurrency": 1, "requests": done,
                         "throughput_rps": done / wall, "p50_ms": percentile(latencies, 50) / batch,
                         "p99_ms": percentile(latencies, 99) / batch})
    return rows


def served_row(url: str, name: str, blobs: list[bytes], requests: int, concurrency: int, grpc: bool) -> dict:
    if grpc:
        import tritonclient.grpc as client_module
    else:
        import tritonclient.http as client_module

    latencies, errors, lock = [], [], threading.Lock()
    counter = iter(range(requests))

    def worker():
        client = client_module.InferenceServerClient(url)
        for i in counter:
            tensor = client_module.InferInput("IMAGE", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[blobs[i % len(blobs)]]], dtype=object))
            t = time.perf_counter()
            try:
                client.infer(name, [tensor])
            except Exception as exc:   # counted and reported, the load goes on
                with lock:
                    errors.append(str(exc).splitlines()[0])
                continue
            with lock:
                latencies.append(time.perf_counter() - t)

    warm = client_module.InferenceServerClient(url)
    tensor = client_module.InferInput("IMAGE", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[blobs[0]]], dtype=object))
    warm.infer(name, [tensor])
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"path": "triton " + ("gRPC" if grpc else "HTTP"), "batch": None, "concurrency": concurrency,
            "requests": len(latencies), "errors": len(errors), "throughput_rps": len(latencies) / wall,
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99)}


def markdown(report: dict) -> str:
    lines = ["| path | concurrency | batch | requests | throughput (req/s) | p50 ms | p99 ms |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['path']} | {r['concurrency']} | {r['batch'] or 'server'} | {r['requests']} | "
                     f"{r['throughput_rps']:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    s = report["summary"]
    lines.append(f"\nbest local {s['best_local_rps']:.2f} req/s; served at concurrency ≥ 4: "
                 f"{s['served_vs_local']:.2f}× of it (goal ≥ 0.8); per-request overhead at concurrency 1: "
                 f"{s['overhead_ms']:.1f} ms")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    from clipad.runtime.atomic import write_bytes_atomic, write_json_atomic
    from clipad.runtime.files import probe_file, refuse_reports_over
    from clipad.runtime.inputs import list_images

    paths = list_images(args.source, "--source").paths
    refuse_reports_over({"--json": args.json, "--markdown": args.markdown}, args.model, paths)
    for flag, path in (("--json", args.json), ("--markdown", args.markdown)):
        probe_file(path, flag)
    blobs = [open(p, "rb").read() for p in paths]
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = local_rows(args.model, blobs, args.requests)
    for c in levels:
        rows.append(served_row(args.url, args.triton_model, blobs, args.requests, c, args.grpc))
        print(f"concurrency {c}: {rows[-1]['throughput_rps']:.2f} req/s", file=sys.stderr, flush=True)
    best_local = max(r["throughput_rps"] for r in rows if r["path"] == "local")
    served = [r for r in rows if r["path"] != "local" and r["concurrency"] >= 4]
    one = [r for r in rows if r["path"] != "local" and r["concurrency"] == 1]
    local_one = [r for r in rows if r["path"] == "local" and r["batch"] == 1][0]
    report = {"model": args.model, "triton_model": args.triton_model, "images": len(blobs), "rows": rows,
              "summary": {"best_local_rps": best_local,
                          "served_vs_local": max((r["throughput_rps"] for r in served), default=float("nan"))
                          / best_local,
                          "overhead_ms": (one[0]["p50_ms"] - local_one["p50_ms"]) if one else float("nan")}}
    text = markdown(report)
    print(text)
    if args.json:
        write_json_atomic(args.json, report)
    if args.markdown:
        write_bytes_atomic(args.markdown, text.encode())
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="triton_load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the export folder (local rows)")
    ap.add_argument("--url", required=True, help="Triton host:port (HTTP, or gRPC with --grpc)")
    ap.add_argument("--triton-model", required=True, help="the served pipeline (NAME_pipeline)")
    ap.add_argument("--source", required=True, help="images (folder or glob)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--grpc", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    return run_cli("triton_load", lambda: run(args), args.quiet)


if __name__ == "__main__":
    sys.exit(main())
