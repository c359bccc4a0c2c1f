"""``edge-bench``'s measurement: one row = one backend × precision × batch, measured in its own process (so peak
memory is the row's own and a crash fails only that row) on the same input images, with the stages the live path
runs: preprocessing, inference, and post-processing including the decision and a 1080p overlay."""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field

import numpy as np

from clipad.runtime import precisions
from clipad.runtime.backends import registry

BACKENDS = tuple(b.name for b in registry.BACKENDS.values() if not b.remote)
PRECISIONS = precisions.NAMES
FRAME = (1920, 1080)


@dataclass
class RowSpec:
    backend: str
    precision: str
    batch: int
    model_dir: str
    images: list[str]            # input files; they are cycled through
    warmup: int = 1
    iters: int = 5
    threads: int | None = None
    clip_weights: str | None = None   # torch row: when the recorded source files moved
    ckpt: str | None = None
    dino_weights: str | None = None
    fewshot: tuple[int, float | None] | None = None   # (K images, coreset share): also time the few-shot graph


@dataclass
class Row:
    backend: str
    precision: str
    batch: int
    status: str                  # ok, skipped, failed
    reason: str | None = None
    device: str | None = None
    runs: str | None = None      # the precision of the file or engine that ran (int8 on a CPU: int8-cpu)
    p50_ms: float | None = None  # per image
    p90_ms: float | None = None
    p99_ms: float | None = None
    batch_p50_ms: float | None = None
    throughput_ips: float | None = None
    stages_ms: dict = field(default_factory=dict)     # median per image: pre, infer, post
    peak_rss_mb: float | None = None
    map_pearson: float | None = None
    score_max_abs: float | None = None
    fewshot_rows: int | None = None     # memory rows per tap of the timed few-shot step (stage "fewshot")
    fewshot_rss_mb: float | None = None  # resident memory the few-shot step added (memory + graph + first run)
    gate: str | None = None      # the export's recorded gate for the file that ran: passed / failed / accepted
    check: str | None = None     # this run's outputs held to the precision's gate limits on these images


def not_applicable(backend: str, precision: str) -> str | None:
    """Why a backend cannot run a precision at all (the row is skipped), or None."""
    return precisions.get(precision).why_not(backend)


def _percentiles(values: list[float]) -> tuple[float, float, float]:
    return tuple(float(np.percentile(values, q)) for q in (50, 90, 99))


def _open(spec: RowSpec):
    """(backend, policy or None) of the row."""
    from clipad.runtime.backends import cuda_buffers
    from clipad.runtime.manifest import Manifest
    from clipad.runtime.policy import DecisionPolicy

    if spec.backend == "tensorrt" and cuda_buffers.gpu_info() is None:
        raise LookupError(f"{cuda_buffers.no_gpu_reason()} here: TensorRT rows need a GPU")
    manifest = Manifest.read(spec.model_dir)
    options = {"precision": spec.precision, "threads": spec.threads, "clip_weights": spec.clip_weights,
               "ckpt": spec.ckpt, "dino_weights": spec.dino_weights}
    taken = registry.get(spec.backend).options
    backend = registry.open_backend(spec.backend, spec.model_dir, manifest,
                                    **{k: v for k, v in options.items() if k in taken})
    return backend, DecisionPolicy(manifest, backend.precision, backend.name)


def measure(spec: RowSpec) -> tuple[Row, tuple[np.ndarray, np.ndarray] | None]:
    """Run one row in this process; returns the row and the outputs on the first len(images) inputs."""
    import resource

    from clipad.runtime.batching import run_batched
    from clipad.runtime.errors import ClipadError
    from clipad.runtime.inputs import load_image
    from clipad.runtime.preprocess import resize_for_model
    from clipad.runtime.render import overlay

    row = Row(spec.backend, spec.precision, spec.batch, "ok")
    try:
        backend, policy = _open(spec)
    except (ClipadError, LookupError, ImportError, OSError) as exc:
        row.status, row.reason = "skipped", str(exc).splitlines()[0][:300]
        return row, None
    row.device, row.runs, (lo, hi), size = backend.description, backend.precision, backend.batch_range, \
        backend.image_size
    names = policy.manifest.class_names

    def run(batch):
        return run_batched(backend.run, batch, lo, hi)

    if not lo <= spec.batch <= hi:
        backend.close()
        row.status = "skipped"
        row.reason = f"the export runs batches {lo}..{hi}; re-export with --dynamic-batch 1:{spec.batch}"
        return row, None
    pictures = [load_image(p) for p in spec.images]
    frame = np.ascontiguousarray(np.asarray(pictures[0].resize(FRAME))[:, :, ::-1])
    first = run(np.stack([resize_for_model(p, size) for p in pictures]))  # also the first warm-up
    outputs = first[:2]
    step = _fewshot_step(spec, policy.manifest, first, row) if spec.fewshot else None
    timings = {"pre": [], "infer": [], "post": []} | ({"fewshot": []} if step else {})
    batches = []
    for i in range(spec.warmup + spec.iters):
        chosen = [pictures[(i * spec.batch + j) % len(pictures)] for j in range(spec.batch)]
        t0 = time.perf_counter()
        batch = np.stack([resize_for_model(p, size) for p in chosen])
        t1 = time.perf_counter()
        maps, scores, *features = run(batch)
        t2 = post_start = time.perf_counter()
        if step is not None:   # its own stage: infer stays the model's, the batch time includes both
            maps, scores = maps.copy(), scores.copy()
            _, maps[:, 0], scores[:, 0] = step(features[0], maps[:, 0], scores[:, 0])
            post_start = time.perf_counter()
            if i >= spec.warmup:
                timings["fewshot"].append(1e3 * (post_start - t2) / spec.batch)
        for m, s in zip(maps[:, 0], scores[:, 0]):
            policy.decide(names[0], m, float(s))
            low, high = policy.display_range(names[0], m)
            overlay(frame, m, low, high, text_lines=[f"score {float(s):.4f}"])
        t3 = time.perf_counter()
        if i >= spec.warmup:
            for key, seconds in zip(("pre", "infer", "post"), (t1 - t0, t2 - t1, t3 - post_start)):
                timings[key].append(1e3 * seconds / spec.batch)
            batches.append(1e3 * (t3 - t0))
    backend.close()
    per_image = [b / spec.batch for b in batches]
    row.p50_ms, row.p90_ms, row.p99_ms = _percentiles(per_image)
    row.batch_p50_ms = float(np.median(batches))
    row.throughput_ips = 1e3 * spec.batch / row.batch_p50_ms
    row.stages_ms = {k: float(np.median(v)) for k, v in timings.items()}
    row.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row, outputs


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _fewshot_step(spec: RowSpec, manifest, first: tuple, row: Row):
    """A run(features, map, score) of the few-shot graph with a seeded memory of the size ``spec.fewshot`` asks
    for (K images' patches, thinned to the coreset share; timing does not depend on the values), or None when this
    file has no patch_features (the row says why)."""
    import math

    from clipad.runtime.fewshot import features_spec, open_graph

    spec_out = features_spec(manifest)
    if spec_out is None or len(first) < 3:
        row.reason = "no few-shot step: exported without --memory-features"
        return None
    k, share = spec.fewshot
    _, taps, patches, channels = spec_out.shape
    rows = max(1, math.ceil((share or 1.0) * k * patches))
    before = _rss_mb()
    memory = np.random.default_rng(0).standard_normal((taps, rows, channels)).astype(np.float32)
    memory /= np.linalg.norm(memory, axis=-1, keepdims=True)
    graph = open_graph(spec.model_dir, manifest, spec.backend, spec.threads)
    graph.run(first[2][:1], memory, first[0][:1, 0], first[1][:1, 0])
    row.fewshot_rows, row.fewshot_rss_mb = rows, round(_rss_mb() - before, 1)
    return lambda features, maps, scores: graph.run(features, memory, maps, scores)


def measure_in_child(spec: RowSpec) -> tuple[Row, tuple | None]:
    """``measure`` in a fresh process (spawn): its peak RSS is the row's own; a crash fails only this row."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        try:
            return pool.apply(measure, (spec,))
        except Exception as exc:  # anything the row raised that is not a clean skip
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            return Row(spec.backend, spec.precision, spec.batch, "failed", f"{type(exc).__name__}: {text}"), None


def environment(threads: int | None) -> dict:
    """CPU/GPU and library versions for the report."""
    from importlib import metadata

    from clipad.runtime.platform_info import cpu_info

    info = cpu_info()
    cpu, flags = info["model"], info["flags"]
    versions = {}
    for package in ("clipad-edge", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "tensorrt-rtx-cu13",
                    "torch", "numpy", "opencv-python-headless"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    from clipad.runtime.backends import cuda_buffers

    gpu = cuda_buffers.gpu_info()
    return {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(),
            "gpu": None if gpu is None else {k: gpu[k] for k in ("name", "compute_capability", "driver_version")},
            "cuda_access": None if gpu is None else (cuda_buffers.access_report() or {}).get("detail"),
            "versions": versions, "threads": threads or "library default"}
