"""``edge-detect``: run an exported model on a camera, stream, video, image, folder or glob."""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time

import numpy as np

from .cli_options import add_model_options, open_detector
from .decision import check_threshold
from .errors import ClipadError, Terminated, run_cli

EPILOG = """\
examples:
  edge-detect --model crane_l14 --camera 0 --show
  edge-detect --model aa_bottle --source line3.mp4 --save overlays/ --jsonl results.jsonl
  edge-detect --model aa_bottle --source 'batch_07/*.png' --save-maps maps/ --threshold 0.62
  edge-detect --model zs_tile --source rtsp://camera.local/stream1 --max-frames 1000 --jsonl live.jsonl

outputs: --save writes overlays (<input stem>.jpg, <video stem>_<frame>.jpg for videos/cameras); --save-maps
writes the raw SxS float32 map of the selected class as .npy; --save-masks writes binary defect masks (PNG, 255 =
defect) at the input's size; --jsonl writes one JSON line per input or frame:
{"time","source","frame","class_name","score","decision_score","normalized_score","p_value","map_max","label",
 "regions","latency_ms":{"pre","infer","post"},"error"} (time: UTC, when the record was written).
OK/NG: with a calibration in the manifest (edge-calibrate) for the precision that runs, NG when the decision score
reaches the calibrated threshold, and regions lists the defect regions (bbox [x, y, w, h], area in pixels of the
input, max); --threshold T instead makes it NG when the raw score >= T; without either there is no label.
Unreadable inputs are reported (error set) and the run continues. A model output that is not finite (NaN/inf) is
labelled NG with error set, never OK; its score and map_max are written as null (every line is strict JSON).
Ctrl-C (or q/Esc in the window) stops cleanly.
"""

log = logging.getLogger("clipad")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="edge-detect", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Anomaly maps, scores and OK/NG decisions from a model exported by "
                                             "export-engine.", epilog=EPILOG)
    add_model_options(ap, triton=True)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--camera", type=int, metavar="N", help="camera index (OpenCV)")
    src.add_argument("--source", metavar="PATH_OR_URL",
                     help="image, folder, glob ('dir/*.png'), video file, or rtsp/http(s) stream URL")
    ap.add_argument("--class-name", help="which baked class to report (default: the first)")
    ap.add_argument("--threshold", type=float, help="image-score threshold for OK/NG: NG when score >= threshold "
                                                    "(default: the manifest's calibrated threshold if it has one, "
                                                    "else no OK/NG)")
    ap.add_argument("--show", action="store_true", help="show a window with overlay, score, OK/NG and FPS")
    ap.add_argument("--save", metavar="DIR", help="write overlay images here")
    ap.add_argument("--save-maps", metavar="DIR", help="write raw SxS float32 maps (.npy) here")
    ap.add_argument("--save-masks", metavar="DIR", help="write binary defect masks (PNG at the input's size) here; "
                                                        "needs a calibrated pixel threshold")
    ap.add_argument("--jsonl", metavar="FILE", help="write one JSON record per input/frame here")
    ap.add_argument("--max-frames", type=int, metavar="N", help="stop after N inputs/frames")
    ap.add_argument("--loop", action="store_true", help="video files: start again at the end (soak tests, demos; "
                                                        "stop with Ctrl-C or --max-frames)")
    ap.add_argument("--reconnect", type=int, default=0, metavar="N",
                    help="cameras/streams: re-open up to N times when frames stop (back-off 0.5 s doubling to 30 s); "
                         "each gap is a record with error set; 0 (default): end at the first loss")
    ap.add_argument("--batch", type=int, default=1, metavar="N",
                    help="images per inference for files, folders and videos (live sources take what is ready); "
                         "reading, inference and post-processing always overlap")
    ap.add_argument("--engine", metavar="FILE", help="TensorRT: which engine listed in the manifest (default: the "
                                                     "best one for this GPU)")
    ap.add_argument("--cuda-graph", action="store_true", help="TensorRT: replay the inference as a CUDA graph "
                                                              "(TensorRT-RTX: its built-in capture)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    return ap.parse_args(argv)


def open_window():
    import cv2

    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise ClipadError("--show: no display ($DISPLAY is not set); use --save DIR to write overlays instead")
    try:
        cv2.namedWindow("edge-detect", cv2.WINDOW_NORMAL)
    except cv2.error:
        raise ClipadError("--show: this OpenCV build has no GUI support (opencv-python-headless?); "
                          "install opencv-python or use --save DIR") from None
    return cv2


def display_range(detector, class_name: str, anomaly_map):
    """The selected class's fixed range from calibration when the manifest has one (frames comparable), else this
    frame's own min-max (a relative map). Non-finite values are ignored."""
    cal = detector.class_calibration(class_name)
    if cal is not None:
        return float(cal.display_range[0]), float(cal.display_range[1])
    finite = anomaly_map[np.isfinite(anomaly_map)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _finite_or_none(value):
    return value if value is None or math.isfinite(value) else None


def record(frame, class_name, pred=None, error=None, post_ms=0.0, regions=None):
    lat = dict(pred.latency_ms) if pred else {"pre": None, "infer": None, "post": None}
    if pred:
        lat["post"] = round(lat["post"] + post_ms, 3)
        lat = {k: round(v, 3) for k, v in lat.items()}

    def value(name):
        return None if pred is None else _finite_or_none(getattr(pred, name))

    return {"time": _now(), "source": frame.source, "frame": frame.frame, "class_name": class_name,
            "score": value("score"),
            "decision_score": value("decision_score"), "normalized_score": value("normalized_score"),
            "p_value": value("p_value"), "map_max": value("map_max"),
            "label": None if pred is None else pred.label, "regions": regions, "latency_ms": lat,
            "error": error if error is not None or pred is None else pred.error}


def input_files(source) -> list[str]:
    return list(getattr(source, "paths", None) or ([source.path] if hasattr(source, "path") else []))


def planned_outputs(args, source) -> dict[str, list[str]]:
    """Every file the run will write that can be known before it starts."""
    stems = getattr(source, "stems", None) or []
    planned = {"--jsonl": [args.jsonl] if args.jsonl else []}
    for flag, folder, ext in (("--save", args.save, ".jpg"), ("--save-maps", args.save_maps, ".npy"),
                              ("--save-masks", args.save_masks, ".png")):
        if folder:
            planned[flag] = [os.path.join(folder, stem + ext) for stem in stems]
    return planned


def run(args) -> int:
    from .outputs import JsonlAppender, probe_folder, refuse_overwriting_inputs
    from .pipeline import StagedRun
    from .sources import open_source

    if args.max_frames is not None and args.max_frames < 1:
        raise ClipadError("--max-frames must be at least 1")
    threshold = check_threshold(args.threshold)
    detector = open_detector(args, engine_file=args.engine, cuda_graph=args.cuda_graph or None)
    try:
        class_name = detector.class_names[detector.class_index(args.class_name)]
        calibrated = detector.class_calibration(class_name) is not None
        if args.save_masks and not calibrated:
            raise ClipadError(f"--save-masks needs a calibrated pixel threshold for {class_name!r}: run "
                              f"edge-calibrate --model {args.model or 'DIR'} --normal GOOD_IMAGES first")
        for flag, folder in (("--save", args.save), ("--save-maps", args.save_maps),
                             ("--save-masks", args.save_masks)):
            if folder:
                probe_folder(folder, flag)
        cv2 = open_window() if args.show else None
        source = open_source(args.camera if args.camera is not None else args.source, max_frames=args.max_frames,
                             reconnect=args.reconnect, loop=args.loop)
        try:
            refuse_overwriting_inputs(planned_outputs(args, source), input_files(source))
            jsonl = JsonlAppender(args.jsonl) if args.jsonl else None
        except BaseException:
            source.close()
            raise
    except BaseException:
        detector.close()
        raise
    if not args.quiet:
        log.info("model %s (%s, %s) on %s; class %r; %s", args.model or args.triton_model, detector.kind, detector.manifest.model.arch,
                 detector.backend.description, class_name, detector.describe_decision(class_name, threshold))
    outputs = FrameOutputs(args, detector, class_name, source, cv2, jsonl)
    interrupted, stopped = None, False
    try:
        stopped = StagedRun(detector, source, class_name, threshold, args.batch, outputs.handle,
                            post_thread=cv2 is None).run()
    except KeyboardInterrupt as exc:   # Ctrl-C, or SIGTERM (Terminated)
        interrupted = exc
    finally:
        source.close()
        outputs.close()
        detector.close()
    if not args.quiet:
        log.info("%s%d input(s), %d unreadable%s%s", "stopped: " if interrupted is not None or stopped else "",
                 outputs.done, outputs.errors, f", {outputs.nonfinite} with non-finite model output (labelled NG)"
                 if outputs.nonfinite else "", f"; JSONL: {args.jsonl}" if args.jsonl else "")
    if interrupted is not None:   # stopping a camera or stream is how such a run ends; a file run was cut short
        return 0 if source.is_live else 143 if isinstance(interrupted, Terminated) else 130
    return 1 if outputs.done and outputs.errors == outputs.done else 0


class FrameOutputs:
    """Everything edge-detect does with one result, in input order: maps, regions and masks, the overlay (file and
    window), the JSONL record, the progress bar and the counts."""

    def __init__(self, args, detector, class_name: str, source, cv2, jsonl):
        self.args, self.detector, self.class_name, self.cv2, self.jsonl = args, detector, class_name, cv2, jsonl
        self.live = source.is_live
        self.progress = None
        if not args.quiet and not self.live:
            from tqdm import tqdm

            self.progress = tqdm(total=source.total, unit="img", dynamic_ncols=True, file=sys.stderr)
        self.done = self.errors = self.nonfinite = 0
        self.fps, self.last = 0.0, time.perf_counter()

    def handle(self, work) -> bool:
        from . import postprocess

        args, frame, pred, error = self.args, work.frame, work.pred, work.error
        regions, post_ms, keep_going = None, 0.0, True
        if pred is not None:
            t = now = time.perf_counter()
            self.fps = 0.9 * self.fps + 0.1 / max(now - self.last, 1e-6) if self.fps else 1 / max(now - self.last, 1e-6)
            self.last = now
            if args.save_maps:
                postprocess.save_npy_atomic(os.path.join(args.save_maps, frame.stem + ".npy"), pred.anomaly_map)
            mask = None
            if pred.pixel_threshold is not None:
                height, width = frame.image.shape[:2]
                mask, regions = postprocess.find_regions(pred.anomaly_map, pred.pixel_threshold, width, height)
                if frame.original_size:   # decoded reduced: report and write in the original's pixels
                    regions = postprocess.scale_regions(regions, frame.original_size[0] / width)
                if args.save_masks:
                    postprocess.save_image_atomic(os.path.join(args.save_masks, frame.stem + ".png"),
                                                  postprocess.resize_mask(mask, frame.original_size))
            if args.save or self.cv2 is not None:
                keep_going = self._overlay(frame, pred, mask)
            post_ms = 1e3 * (time.perf_counter() - t)
            if pred.error is not None:
                self.nonfinite += 1
                log.debug("%s: %s", frame.source, pred.error)
        else:
            self.errors += 1
            log.debug("%s: %s", frame.source, error)
        if self.jsonl:
            self.jsonl.write(record(frame, self.class_name, pred, error, post_ms, regions))
        self.done += 1
        if self.progress:
            self.progress.update(1)
        return keep_going

    def _overlay(self, frame, pred, mask) -> bool:
        from . import postprocess

        lines = [f"{self.class_name}: score {pred.score:.4f}  map max {pred.map_max:.4f}"]
        if pred.p_value is not None:
            lines.append(f"decision {pred.decision_score:.4f}  p {pred.p_value:.3f}")
        if pred.label:
            lines.append(pred.label)
        if self.live:
            lines.append(f"{self.fps:.1f} FPS")
        low, high = display_range(self.detector, self.class_name, pred.anomaly_map)
        shown = postprocess.overlay(frame.image, pred.anomaly_map, low, high, text_lines=lines, label=pred.label,
                                    region_mask=mask)
        if self.args.save:
            postprocess.save_image_atomic(os.path.join(self.args.save, frame.stem + ".jpg"), shown)
        if self.cv2 is not None:
            self.cv2.imshow("edge-detect", shown)
            if self.cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                return False
        return True

    def close(self) -> None:
        if self.progress:
            self.progress.close()
        if self.jsonl:
            self.jsonl.close()
        if self.cv2 is not None:
            self.cv2.destroyAllWindows()


def main(argv=None) -> int:
    return run_cli("edge-detect", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
