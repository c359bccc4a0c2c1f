"""``export-engine``: training checkpoint → ONNX + manifest.json, verified against the torch reference; precisions,
TensorRT engines and Triton repositories from an existing export."""
from __future__ import annotations

import argparse
import logging
import sys

from clipad.runtime import precisions
from clipad.runtime.commands import check_threads, run_cli
from clipad.runtime.errors import ClipadError

from .models.registry import KINDS
from .options import (
    QUANTIZERS,
    CalibrationOptions,
    EngineOptions,
    ExportOptions,
    ModelOptions,
    TritonOptions,
    parse_batch,
)

EPILOG = """\
examples:
  export-engine --model crane --ckpt trained_on_mvtec_crane/epoch_5.pth --clip-weights ViT-L-14-336px.pt --output crane_l14
  export-engine --model aaclip --ckpt aaclip_save_dir --clip-weights ViT-L-14-336px.pt --class-name bottle --output aa_bottle
  export-engine --model clip --clip-weights ViT-L-14-336px.pt --class-name "speckled tile surface" --output zs_tile
  export-engine --model clip --random-init --arch ViT-B-16 --image-size 224 --class-name tile --output try_it
  export-engine --model crane --ckpt epoch_5.pth --clip-weights ViT-L-14-336px.pt --precision int8 \
      --calib-data line3/good --output crane_int8                  # + an engine if TensorRT can build here
  export-engine --from-onnx crane_int8 --precision int8             # on the target: engine for its GPU
  export-engine --from-onnx crane_l14 --precision int8 --calib-data line3/good   # add INT8 later, no torch needed
  export-engine --from-onnx crane_l14 --precision fp16 --trt-flavor rtx --compute-capability 8.6

class names: AA-CLIP and zero-shot CLIP put the class name into their prompts. The official dataset names
(MVTec: bottle, cable, capsule, carpet, grid, hazelnut, leather, metal_nut, pill, screw, tile, transistor,
toothbrush, wood, zipper; VisA: candle, capsules, cashew, chewinggum, fryum, macaroni1, macaroni2, pcb1..pcb4,
pipe_fryum; MPDD, BTAD 01..03, medical Brain/Liver/Retina/colon sets) map to AA-CLIP's descriptions
(e.g. bottle -> "dark bottle", Brain -> "scan", medical domain). Any other name is used literally: pick a short
visual description of your product, as the authors did. Crane's and Crane+'s prompts are learned and
class-agnostic (one output channel; --class-name is only its label).

output: DIR/model.onnx (FP32, input "images" uint8 [B,S,S,3] RGB already resized to SxS; outputs
"anomaly_map" [B,K,S,S] and "image_score" [B,K] float32, raw), model.fp16.onnx / model.int8.onnx with
--precision, engines model.<precision>.<flavor>-sm<XY>.engine (pure TensorRT plans), and DIR/manifest.json.
Written atomically: a failed export leaves no DIR, or the previous one intact. Without TensorRT or a GPU here the
ONNX files are still written and the command to build the engine on the target is printed.
"""

log = logging.getLogger("clipad")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="export-engine", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Export a CLIP anomaly detector (AA-CLIP, Crane, Crane+, zero-shot CLIP) "
                                             "to ONNX with baked text anchors, verified against the torch reference, "
                                             "optionally as FP16/INT8 ONNX and TensorRT engines.",
                                 epilog=EPILOG)
    ap.add_argument("--model", choices=list(KINDS), help="model kind (required unless --from-onnx): " + "; ".join(
        f"{k.name}: {k.summary}" for k in KINDS.values()))
    ap.add_argument("--ckpt", help="AA-CLIP: the training save folder (text_adapter.pth + image_adapter_<N>.pth); "
                                   "Crane: an epoch_N.pth prompt checkpoint. Required for aaclip and crane.")
    ap.add_argument("--epoch", type=int, help="AA-CLIP: image_adapter epoch to use (default: the latest)")
    ap.add_argument("--clip-weights", help="local CLIP base weights: OpenAI ViT-L-14-336px.pt (TorchScript), "
                                           "a state dict, an open_clip checkpoint or .safetensors (never downloaded)")
    ap.add_argument("--dino-weights", metavar="FILE",
                    help="Crane+: the local DINOv2 ViT-B/14 with registers state dict "
                         "(dinov2_vitb14_reg4_pretrain.pth; never downloaded)")
    ap.add_argument("--memory-features", action="store_true",
                    help="also output patch_features [B, T, P, C] (the unit patch tokens; Crane+ adds its DINOv2 "
                         "patches) and write fewshot.onnx, so edge-calibrate --memory K can add a few-shot memory "
                         "of normal patches (docs/few-shot.md)")
    ap.add_argument("--random-init", action="store_true",
                    help="use seeded random base weights instead of --clip-weights (pipeline trials only: "
                         "the maps mean nothing)")
    ap.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")
    ap.add_argument("--output", help="output directory (replaced atomically; required unless --from-onnx)")
    ap.add_argument("--arch", default="ViT-L-14-336", help="open_clip architecture (default ViT-L-14-336)")
    ap.add_argument("--image-size", type=int, default=518, help="square input size S (default 518: 37x37 patches)")
    ap.add_argument("--class-name", nargs="+", dest="class_names", metavar="NAME",
                    help="one or more object names baked into the graph (aaclip, clip: required)")
    ap.add_argument("--dataset", choices=["MVTec", "VisA", "MPDD", "BTAD", "Medical"],
                    help="require --class-name to be an official name of this dataset")
    ap.add_argument("--domain", choices=["industrial", "medical"],
                    help="AA-CLIP blur: industrial 7/σ1, medical 9/σ1.5 (default: from the class names)")
    ap.add_argument("--activation", choices=["quick_gelu", "gelu"],
                    help="zero-shot CLIP MLP activation (default quick_gelu, as OpenAI weights need)")
    batch = ap.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=None, help="fixed batch size (default 1)")
    batch.add_argument("--dynamic-batch", metavar="MIN:MAX", help="dynamic batch range, e.g. 1:8")
    ap.add_argument("--verify-images", metavar="DIR",
                    help="images for the torch-vs-ONNX parity gate and the FP16/INT8 accuracy gates "
                         "(default: generated images for parity, held-back calibration images for INT8)")
    prec = ap.add_argument_group("precision (the FP32 model.onnx is always written; it is the reference)")
    prec.add_argument("--precision", choices=list(precisions.EXPORTABLE), default=precisions.REFERENCE.name,
                      help="also write this precision's file: " + "; ".join(
                          f"{p.name}: {p.file}, {p.summary}" + (" (needs --calib-data)" if p.needs_calibration_data
                                                                else "")
                          for p in precisions.PRECISIONS.values() if p.conversion))
    prec.add_argument("--calib-data", metavar="DIR",
                      help="folder of normal images (≥100 recommended): INT8's calibration set, and for every low "
                      "precision the OK/NG gate (each side's own conformal threshold at α 5%% and 10%%, flips on "
                      "held-back normal and verify images)")
    prec.add_argument("--calib-method", choices=["minmax", "entropy", "percentile"], default="minmax",
                      help="INT8 activation range calibration (default minmax; entropy and percentile build "
                           "onnxruntime's histograms, slower)")
    prec.add_argument("--int8-high-precision", choices=list(precisions.INT8_REMAINDERS),
                      default=precisions.INT8_REMAINDERS[0],
                      help="INT8: type of everything that is not a quantized linear layer (attention, GELU, "
                           "residual adds; LayerNorm, softmax and the head stay FP32 either way). Default fp16, "
                           "as ModelOpt does: a strongly typed engine runs exactly these types. int8-bf16 sets "
                           "its own (the bf16 keep-list)")
    prec.add_argument("--int8-keep-float", nargs="+", metavar="SCOPE", default=[],
                      help="INT8 (every INT8 file): leave linear layers whose module path contains SCOPE unquantized, "
                           "e.g. mlp.c_proj (the post-GELU MLP projections) or resblocks.23., or name them as a "
                           "manifest's kept_float_nodes lists them (node_MatMul_171 …), or with --from-onnx say "
                           "from:int8-cpu (or from:int8) for the layers that file of this export kept float: reuses "
                           "what an earlier sensitivity pass found")
    prec.add_argument("--int8-quantizer", choices=list(QUANTIZERS), default=QUANTIZERS[0],
                      help="INT8 (the Q/DQ file): who places and calibrates the linear layers' Q/DQ: onnxruntime's "
                           "quantize_static with our bounded-memory range collector (default), NNCF (OpenVINO's "
                           "quantizer; fast bias correction) or NVIDIA ModelOpt (TensorRT's quantizer; runs in its "
                           "own environment, named by $CLIPAD_MODELOPT_PYTHON; minmax or entropy). The manifest "
                           "records which, and whether the file suits TensorRT")
    prec.add_argument("--int8-smoothquant", type=float, metavar="ALPHA", dest="int8_smoothquant",
                      help="INT8 (the Q/DQ file): SmoothQuant before quantizing: each LayerNorm output feeding "
                           "linear layers is divided per channel by max|x|^ALPHA / max|w|^(1-ALPHA), folded into "
                           "the LayerNorm and the weights (the FP32 model is unchanged in value), so the one static "
                           "activation scale per tensor fits every channel. 0.5 is SmoothQuant's default")
    prec.add_argument("--int8-shift", action="store_true",
                      help="INT8 (the Q/DQ file): centre each linear layer's input whose calibrated range is "
                           "lopsided (GELU outputs span -0.17 … 5) on zero, the shift folded into the layer's bias, "
                           "so TensorRT's symmetric INT8 spends its codes on the values that occur (about one bit "
                           "more on the MLP projections)")
    prec.add_argument("--no-int8-sensitivity", dest="int8_sensitivity", action="store_false",
                      help="INT8: when the gate fails, stop there. By default a failed INT8 gate (with --calib-data) "
                           "measures which groups of linear layers move the decision score most, keeps 1, 2, 4 … of "
                           "the worst float (at most a quarter of the CLIP tower's) and gates again; the manifest "
                           "records each group's effect and what was kept")
    int8_gate = next(p.gate for p in precisions.PRECISIONS.values() if p.conversion == "static-qdq")
    prec.add_argument("--int8-map-min", type=float, metavar="PEARSON",
                      help=f"INT8 (every INT8 file): hold the gate's map Pearson to PEARSON instead of "
                           f"{int8_gate.map_pearson_min:g}, e.g. 0.995; only raises it. When the map is all the gate "
                           "fails on, the sensitivity pass keeps float the groups that move the map most (not the "
                           "decision score)")
    prec.add_argument("--accept-accuracy-loss", action="store_true",
                      help="write FP16/INT8 files even when their accuracy gate fails, and an export whose "
                           "torch-vs-ONNX parity gate fails (recorded in the manifest)")
    eng = ap.add_argument_group("TensorRT engine")
    eng.add_argument("--from-onnx", metavar="DIR",
                     help="work on an existing export directory: add model.fp16/int8.onnx when missing (or redo "
                          "INT8 with --calib-data), then build the engine")
    eng.add_argument("--trt-flavor", choices=["auto", "tensorrt", "rtx"], default="auto",
                     help="tensorrt (on the target GPU) or rtx (TensorRT for RTX; ahead-of-time with "
                          "--compute-capability, no GPU needed); auto: whichever can build here")
    eng.add_argument("--compute-capability", metavar="X.Y", help="TensorRT-RTX target, e.g. 8.6 (7.5 8.0 8.6 8.9 "
                                                                   "12.0 12.1)")
    eng.add_argument("--device", type=int, default=0, metavar="N",
                     help="GPU index to build on and for (default 0; ignored by ahead-of-time TensorRT-RTX builds "
                          "without a GPU)")
    eng.add_argument("--workspace", type=float, default=4.0, metavar="GB", help="builder workspace (default 4)")
    eng.add_argument("--timing-cache", metavar="FILE", help="reuse/update this TensorRT timing cache")
    eng.add_argument("--version-compatible", action="store_true",
                     help="full TensorRT: plan loadable by later TensorRT versions (lean runtime; slower)")
    eng.add_argument("--no-engine", action="store_true", help="only write ONNX files, even if TensorRT is here")
    tri = ap.add_argument_group("Triton Inference Server (with --from-onnx; edge-serve REPO then serves it)")
    tri.add_argument("--triton-repo", metavar="REPO",
                     help="write the export into this Triton model repository as NAME (the model), NAME_pre, "
                          "NAME_post and NAME_pipeline (JPEG/PNG bytes in, map, score, label out), serving "
                          "--precision")
    tri.add_argument("--triton-name", metavar="NAME", help="model name in the repository (default: the folder name)")
    tri.add_argument("--triton-backend", choices=["auto", "tensorrt", "onnxruntime", "python"], default="auto",
                     help="tensorrt: a listed engine as model.plan (built for the server's GPU and TensorRT); "
                          "onnxruntime: Triton's ONNX Runtime backend; python: the lean runtime inside Triton's "
                          "Python backend (CPU servers, needs clipad-edge in the server's Python); auto: tensorrt "
                          "when the export lists an engine, else onnxruntime")
    tri.add_argument("--triton-accelerator", choices=["none", "tensorrt", "openvino"], default="none",
                     help="onnxruntime: Triton's execution accelerator (none: CUDA on GPU instances, else CPU; "
                          "tensorrt: ONNX Runtime's TensorRT provider on GPUs; openvino: on CPUs)")
    tri.add_argument("--triton-engine", metavar="FILE", help="tensorrt: which listed engine (default: the newest of "
                                                             "--precision)")
    tri.add_argument("--instances", type=int, default=1, metavar="N", help="model instances (default 1)")
    tri.add_argument("--max-queue-delay-us", type=int, default=2000, metavar="US",
                     help="dynamic batching: how long a request may wait for others (default 2000)")
    tri.add_argument("--triton-max-batch", type=int, metavar="N",
                     help="python: largest batch Triton gathers (default: the larger of 8 and the export's largest "
                          "batch); the other backends take the export's batch range")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch (the export and its parity "
                                                              "gate; default: torch's own)")
    ap.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    args = ap.parse_args(argv)
    if not args.from_onnx and (args.model is None or args.output is None):
        ap.error("--model and --output are required (or --from-onnx DIR to build an engine)")
    if args.triton_repo and not args.from_onnx:
        ap.error("--triton-repo works on an existing export: export-engine --from-onnx DIR --triton-repo REPO")
    return args


def options(args) -> ExportOptions:
    """The parsed command line as the orchestrator's typed options."""
    if args.device < 0:
        raise ClipadError(f"--device {args.device}: a GPU index 0, 1, …")
    check_threads(args.threads)
    model = None
    if not args.from_onnx:
        model = ModelOptions(kind=args.model, ckpt=args.ckpt, epoch=args.epoch, clip_weights=args.clip_weights,
                             random_init=args.random_init, seed=args.seed, arch=args.arch,
                             image_size=args.image_size, class_names=args.class_names, dataset=args.dataset,
                             domain=args.domain, dino_weights=args.dino_weights,
                             memory_features=args.memory_features,
                             quick_gelu=None if args.activation is None else args.activation == "quick_gelu")
    triton = None
    if args.triton_repo:
        triton = TritonOptions(repo=args.triton_repo, name=args.triton_name, flavor=args.triton_backend,
                               accelerator=args.triton_accelerator, engine=args.triton_engine,
                               instances=args.instances, max_queue_delay_us=args.max_queue_delay_us,
                               max_batch=args.triton_max_batch)
    return ExportOptions(
        output=args.from_onnx or args.output, model=model, batch=parse_batch(args.batch, args.dynamic_batch),
        verify_images=args.verify_images, precision=args.precision,
        calibration=CalibrationOptions(data=args.calib_data, method=args.calib_method,
                                       high_precision=args.int8_high_precision,
                                       keep_float=tuple(args.int8_keep_float),
                                       sensitivity=args.int8_sensitivity, quantizer=args.int8_quantizer,
                                       smooth_alpha=args.int8_smoothquant, shift=args.int8_shift,
                                       map_min=args.int8_map_min),
        accept_accuracy_loss=args.accept_accuracy_loss,
        engine=EngineOptions(build=not args.no_engine, flavor=args.trt_flavor,
                             compute_capability=args.compute_capability, workspace_gb=args.workspace,
                             timing_cache=args.timing_cache, version_compatible=args.version_compatible,
                             device=args.device),
        triton=triton, threads=args.threads)


def dispatch(args) -> int:
    from .pipeline import run

    return run(options(args))


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli("export-engine", lambda: dispatch(args), args.quiet, "interrupted; nothing written")


if __name__ == "__main__":
    sys.exit(main())
