"""``edge-bench``: latency, throughput, memory and accuracy of every backend × precision × batch on this machine, in
one table (ratios within one run are the comparable numbers)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import asdict

from clipad.runtime import precisions
from clipad.runtime.commands import run_cli
from clipad.runtime.errors import ClipadError

from .latency import BACKENDS, PRECISIONS

EPILOG = """\
examples:
  edge-bench --model aa_tile --json bench.json --markdown bench.md --plot bench.png
  edge-bench --model crane_l14 --backends onnxruntime,openvino --precisions fp32,bf16,int8 --batch 1,4
  edge-bench --model aa_tile --source line3/good --iters 20 --threads 4
  edge-bench --model aa_tile --source line3/good --save-choice     # then: edge-detect --backend best

rows: every backend x precision x batch. status ok, or skipped / failed with the reason (no GPU, TensorRT not
installed, no engine for this GPU, a precision the backend cannot run, a batch outside the export's range). Each row
runs in its own process on the same images (--source: a folder, glob or one image, at most --max-images; default:
4 generated samples): p50/p90/p99 per image, batch p50, throughput, median stage split (pre = resize, infer, post =
decision + a 1920x1080 overlay), peak RSS, and its accuracy against the FP32 reference on those images (map Pearson
min, max |delta score|). gate: the verdict export-engine recorded for the file that ran (passed, failed, or
accepted: failed and kept with --accept-accuracy-loss); check: these images held to the same precision's limits
(only a hint on a few images). The torch row rebuilds the reference model (needs the export extra) from the files
the manifest records, checked by sha256, or from --clip-weights/--ckpt (and --dino-weights for Crane+); its bf16
row runs that model under torch.autocast(bfloat16) (no gate: it is not an exported file).
chip (unless --no-ceiling): the model's matrix-product GFLOP per image, this machine's rate on a ViT-L MLP-shaped
product per library and data type (numpy FP32 and torch BF16 for torch, ONNX Runtime FP32, dynamic INT8 and Q/DQ
INT8, OpenVINO FP32, BF16 and Q/DQ INT8), and per row the achieved GFLOP/s (inference time only) and its share of
that ceiling.
--save-choice records the fastest edge row (batch 1 first) whose export gate passed (or the FP32 reference) for this
machine in DIR/bench-choices.json; edge-detect --backend best runs it (with that precision's own calibration).
"""

log = logging.getLogger("clipad")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="edge-bench", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Latency, throughput, memory and accuracy of a model exported by "
                                             "export-engine on every backend and precision here.", epilog=EPILOG)
    ap.add_argument("--model", required=True, metavar="DIR", help="directory written by export-engine")
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated (default {','.join(BACKENDS)})")
    ap.add_argument("--precisions", default=",".join(PRECISIONS),
                    help=f"comma-separated (default {','.join(PRECISIONS)})")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    ap.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed runs per row (default 1)")
    ap.add_argument("--iters", type=int, default=5, metavar="N", help="timed runs per row (default 5)")
    ap.add_argument("--threads", type=int, help="CPU threads for every backend (default: each library's own)")
    ap.add_argument("--source", metavar="IMAGES", help="folder, glob or one image (default: 4 generated)")
    ap.add_argument("--max-images", type=int, default=16, metavar="N",
                    help="use at most the first N images of --source (default 16; said when it cuts)")
    ap.add_argument("--clip-weights", help="torch row: the base weights, when the recorded file moved")
    ap.add_argument("--ckpt", help="torch row: the checkpoint, when the recorded file moved")
    ap.add_argument("--dino-weights", help="torch row (Crane+): the DINOv2 weights, when the recorded file moved")
    ap.add_argument("--fewshot", type=int, metavar="K",
                    help="also time the few-shot step (fewshot.onnx, an export made with --memory-features) with a "
                         "memory of K images' patches (seeded values; the time does not depend on them)")
    ap.add_argument("--coreset", type=float, metavar="SHARE", help="--fewshot: the memory thinned to this share")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--markdown", metavar="FILE")
    ap.add_argument("--plot", metavar="FILE.png")
    ap.add_argument("--no-ceiling", action="store_true",
                    help="skip the chip columns (model GFLOP, this machine's matrix-product rate per library and data "
                         "type, each row's achieved GFLOP/s and its fraction of that ceiling; ~10 s)")
    ap.add_argument("--save-choice", action="store_true",
                    help="record this machine's fastest gate-passing backend and precision for --backend best")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def _list(text: str, allowed, what: str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if allowed is not None and t not in allowed]
    if bad or not items:
        raise ClipadError(f"--{what} {text!r}: choose from {', '.join(allowed)}")
    return items


def _batches(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ClipadError(f"--batch {text!r}: comma-separated sizes >= 1, e.g. 1,4")
    return sizes


def _images(source: str | None, tmp: str, limit: int) -> list[str]:
    if source is None:
        from clipad.calibration.samples import write_samples

        return write_samples(tmp, count=4, seed=11)
    from clipad.runtime.inputs import list_images

    paths = list_images(source, "--source").paths
    if len(paths) > limit:
        log.info("--source %s: using the first %d of %d images (--max-images)", source, limit, len(paths))
    return paths[:limit]


def _accuracy(rows, outputs, manifest) -> None:
    """Each row against the FP32 reference (ONNX Runtime fp32, else torch fp32) on the same inputs, held to its
    precision's limits (check), next to the gate export-engine recorded for the file that ran (gate)."""
    from clipad.runtime.compare import compare, gate

    reference_name = precisions.REFERENCE.name
    ok = [(r, out) for r, out in zip(rows, outputs) if r.status == "ok" and out is not None]
    reference = next((out for r, out in ok if r.runs == reference_name and r.backend == "onnxruntime"), None) or \
        next((out for r, out in ok if r.runs == reference_name), None)
    for row, out in ok:
        recorded = manifest.precisions.get(row.runs)
        if recorded is not None and row.backend != "torch":   # torch runs the rebuilt model, not the gated file
            g = recorded.gate
            row.gate = "passed" if g.passed else "accepted" if g.accepted_despite_failure else "failed"
        if reference is None:
            continue
        c = compare(reference, out)
        row.map_pearson, row.score_max_abs = c.map_pearson_min, c.image_score.max_abs
        limits = precisions.get(row.runs).gate
        if limits is not None:
            row.check = "passed" if gate(c, limits, row.runs, reference_name, row.backend).passed else "failed"


def _num(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    from .chip import SHAPE

    env = report["env"]
    lines = [f"**{report['model']}** — {env['cpu']}, {env['cores']} cores; threads: {env['threads']}",
             f"CPU flags: {', '.join(env.get('cpu_flags') or []) or 'n/a'}", "",
             "| backend | precision | batch | status | p50 ms/img | p90 | p99 | img/s | pre / infer / post ms | "
             "peak RSS MB | map Pearson | max Δscore | gate | check | GFLOP/s | of ceiling |", "|" + "---|" * 16]
    fewshot_lines: list[str] = []
    chip = report.get("chip")
    if chip:
        rates = ", ".join(f"{k} {v:g}" for k, v in chip["ceilings_gflops"].items()) or "none measured"
        work = "n/a" if chip["model_gflop"] is None else f"{chip['model_gflop']:.1f} GFLOP of matrix products per image"
        lines[2:2] = [f"chip: {work}; ceiling GFLOP/s ({'×'.join(map(str, SHAPE))} product): {rates}", ""]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['backend']} | {r['precision']} | {r['batch']} | {r['status']}: {r['reason']} |"
                         + " |" * 12)
            continue
        st = r["stages_ms"]
        if "fewshot" in st:
            fewshot_lines.append(f"| {r['backend']} | {r['precision']} | {r['batch']} | {r['fewshot_rows']} | "
                                 f"{st['infer']:.1f} | {st['fewshot']:.2f} | {st['fewshot'] / st['infer']:.1%} | "
                                 f"{r['fewshot_rss_mb']:.0f} |")
        lines.append(f"| {r['backend']} | {r['precision']} | {r['batch']} | ok ({r['device']}) | {r['p50_ms']:.1f} | "
                     f"{r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['throughput_ips']:.3g} | {st['pre']:.1f} / "
                     f"{st['infer']:.1f} / {st['post']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{'–' if r['map_pearson'] is None else format(r['map_pearson'], '.5f')} | "
                     f"{'–' if r['score_max_abs'] is None else format(r['score_max_abs'], '.2e')} | "
                     f"{r['gate'] or '–'} | {r['check'] or '–'} | {_num(r.get('gflops'), '.1f')} | "
                     f"{_num(r.get('of_ceiling'), '.0%')} |")
    if fewshot_lines:
        lines += ["", "few-shot step (fewshot.onnx after the model; p50 ms per image):", "",
                  "| backend | precision | batch | memory rows per tap | model infer ms | few-shot ms | of infer | "
                  "added RSS MB |",
                  "|" + "---|" * 8] + fewshot_lines
    return "\n".join(lines) + "\n"


def plot(path: str, report: dict) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipad.runtime.atomic import write_bytes_atomic

    rows = [r for r in report["rows"] if r["status"] == "ok"]
    if not rows:
        raise ClipadError("--plot: no row ran")
    labels = [f"{r['backend']}\n{r['precision']} b{r['batch']}" for r in rows]
    p50 = [r["p50_ms"] for r in rows]
    err = [[0] * len(rows), [r["p99_ms"] - r["p50_ms"] for r in rows]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(rows)) * 1.6, 4.8),
                                      gridspec_kw={"width_ratios": [2, 1]})
    left.bar(labels, p50, yerr=err, capsize=4, color=["tab:red" if "failed" in (r["gate"], r["check"])
                                                      else "tab:green" for r in rows])
    left.set(ylabel="ms per image (p50, whisker to p99)", title=report["model"])
    right.bar(labels, [r["map_pearson"] or 0 for r in rows],
              color=["tab:red" if "failed" in (r["gate"], r["check"]) else "tab:blue" for r in rows])
    low = min([r["map_pearson"] for r in rows if r["map_pearson"]] + [0.99])
    right.set(ylim=(low - 0.05 * (1 - low) - 0.001, 1.0005), ylabel="map Pearson vs FP32",
              title="accuracy (red: gate or check failed)")
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def save_choice(model_dir: str, manifest, report: dict) -> dict:
    """The fastest row an edge box can run whose export gate passed (or that runs the reference), saved for this
    machine; batch 1 rows are preferred (a live camera hands one frame at a time)."""
    import datetime

    from clipad.runtime import best_choice
    from clipad.runtime.backends import registry

    def eligible(r: dict) -> bool:
        spec = registry.BACKENDS.get(r["backend"])
        return (r["status"] == "ok" and spec is not None and spec.edge and not spec.remote
                and (r["gate"] == "passed" or (r["gate"] is None and precisions.get(r["precision"]).reference)))

    rows = [r for r in report["rows"] if eligible(r)]
    if not rows:
        raise ClipadError("--save-choice: no edge row ran with a passing export gate; nothing saved")
    smallest = min(r["batch"] for r in rows)
    best = min((r for r in rows if r["batch"] == smallest), key=lambda r: r["p50_ms"])
    env = {**report["env"], "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    return best_choice.save(model_dir, manifest, best, env)


def run(args) -> int:
    import tempfile

    from tqdm import tqdm

    from clipad.runtime.atomic import write_bytes_atomic, write_json_atomic
    from clipad.runtime.commands import check_threads
    from clipad.runtime.files import probe_file, refuse_reports_over
    from clipad.runtime.manifest import Manifest
    from clipad.runtime.schema import dump

    from .latency import Row, RowSpec, environment, measure_in_child, not_applicable

    manifest = Manifest.read(args.model)   # a clear error before anything runs
    backends = _list(args.backends, BACKENDS, "backends")
    wanted = _list(args.precisions, PRECISIONS, "precisions")
    sizes = _batches(args.batch)
    if args.iters < 1 or args.warmup < 0:
        raise ClipadError("--iters must be >= 1 and --warmup >= 0")
    if args.max_images < 1:
        raise ClipadError("--max-images must be >= 1")
    check_threads(args.threads)
    fewshot = None
    if args.fewshot is not None:
        from clipad.calibration.memory import check_coreset, check_images
        from clipad.runtime.fewshot import require_features

        check_images(args.fewshot, "--fewshot")
        check_coreset(args.coreset)
        require_features(manifest, args.model)
        fewshot = (args.fewshot, args.coreset)
    elif args.coreset is not None:
        raise ClipadError("--coreset sizes the few-shot memory: give --fewshot K too")
    reports = {"--json": args.json, "--markdown": args.markdown, "--plot": args.plot}
    for flag, path in reports.items():
        probe_file(path, flag)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ClipadError("--plot needs matplotlib: pip install 'clipad-edge[eval]'") from None
    with tempfile.TemporaryDirectory(prefix="clipad-bench-") as tmp:
        images = _images(args.source, tmp, args.max_images)
        refuse_reports_over(reports, args.model, images)
        specs = [(b, p, n) for b in backends for p in wanted for n in sizes]
        rows, outputs = [], []
        for backend, precision, batch in tqdm(specs, desc="edge-bench rows", unit="row", disable=args.quiet,
                                              file=sys.stderr):
            reason = not_applicable(backend, precision)
            if reason:
                row, out = Row(backend, precision, batch, "skipped", reason), None
            else:
                row, out = measure_in_child(RowSpec(backend, precision, batch, args.model, images, args.warmup,
                                                    args.iters, args.threads, args.clip_weights, args.ckpt,
                                                    args.dino_weights, fewshot))
            rows.append(row)
            outputs.append(out)
    _accuracy(rows, outputs, manifest)
    report = {"model": args.model, "env": environment(args.threads), "images": len(images),
              "rows": [asdict(r) for r in rows], "chip": None}
    if not args.no_ceiling:
        from . import chip

        report["chip"] = {"model_gflop": chip.model_gflop(manifest.verify_file(args.model, precisions.REFERENCE.file)),
                          "ceilings_gflops": chip.ceilings(args.threads, tuple(backends))}
        chip.annotate(report["rows"], report["chip"]["model_gflop"], report["chip"]["ceilings_gflops"])
    else:
        for r in report["rows"]:
            r["gflops"] = r["of_ceiling"] = None
    if args.save_choice:
        report["choice"] = save_choice(args.model, manifest, report)
    text = markdown(report)
    print(text)
    if args.save_choice:
        c = report["choice"]
        print(f"saved for this machine: {c['backend']} {c['precision']} ({c['p50_ms']:.0f} ms/image, gate "
              f"{c['gate']}) in {os.path.join(args.model, 'bench-choices.json')}; run edge-detect --backend best")
    if args.json:
        write_json_atomic(args.json, dump(report))
    if args.markdown:
        write_bytes_atomic(args.markdown, text.encode())
    if args.plot:
        plot(args.plot, report)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli("edge-bench", lambda: run(args), args.quiet, "interrupted; no report written")


if __name__ == "__main__":
    sys.exit(main())
