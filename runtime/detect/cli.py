"""``edge-detect``: run an exported model on cameras, streams, videos, images, folders or globs — one, or several in
one process (a station: live view, MQTT, webhook, evidence; ``clipad.runtime.station``)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ..commands import (
    EXIT_INTERRUPTED,
    EXIT_NO_INPUT,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    add_model_options,
    open_detector,
    run_cli,
)
from ..decision import check_threshold
from ..errors import ClipadError, Terminated
from ..station.options import add_station_options, station_config
from .frame_outputs import FrameOutputs, OutputOptions

EPILOG = """\
examples:
  edge-detect --model crane_l14 --camera 0 --show
  edge-detect --model aa_bottle --source line3.mp4 --save overlays/ --jsonl results.jsonl
  edge-detect --model aa_bottle --source 'batch_07/*.png' --save-maps maps/ --threshold 0.62
  edge-detect --model zs_tile --source rtsp://camera.local/stream1 --max-frames 1000 --jsonl live.jsonl
  edge-detect --model aa_bottle --source 'gst:nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1920,\
height=1080,framerate=30/1 ! nvvidconv ! video/x-raw,format=BGRx'     # Jetson CSI camera (OpenCV with GStreamer)
  edge-detect --model aa_bottle --camera top=0 --source side=rtsp://cam2/s1 --http 0.0.0.0:8080 \
      --http-token-file token --mqtt mqtt://broker.local/line3 --jsonl line3.jsonl      # a station
  edge-detect --model aa_bottle --config station.toml                                 # the same from a file

outputs: --save writes overlays (<input stem>.jpg, <video stem>_<frame>.jpg for videos/cameras); --save-maps
writes the raw SxS float32 map of the selected class as .npy; --save-masks writes binary defect masks (PNG, 255 =
defect) at the input's size; --jsonl writes one JSON line per input or frame:
{"time","source","frame","class_name","score","decision_score","normalized_score","p_value","map_max","fewshot_max",
 "label","pixel_label","regions","calibration","latency_ms":{"pre","infer","post"},"error"} (time: UTC, when written).
With a few-shot memory (edge-calibrate --memory) score, map, map_max, regions and masks are the fused values,
fewshot_max is the few-shot map's maximum and --save-maps also writes it as <stem>.fewshot.npy (docs/few-shot.md).
OK/NG: with a calibration in the manifest (edge-calibrate) for the precision that runs, NG when the decision score
reaches the calibrated threshold; pixel_label is the pixel rule (NG when the map reaches the calibrated pixel
threshold) and regions lists the defect regions (bbox [x, y, w, h], area in pixels of the input, max, kind "defect";
an NG part whose resized map stays below the pixel threshold gets its peak region, kind "peak"); calibration names
the calibration that decided. --threshold T instead makes it NG when the raw score >= T; without either, no label.
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
    ap.add_argument("--class-name", help="which baked class to report (default: the first; a station file can give "
                                         "each camera its own)")
    ap.add_argument("--threshold", type=float, help="image-score threshold for OK/NG: NG when score >= threshold "
                                                    "(default: the manifest's calibrated threshold if it has one, "
                                                    "else no OK/NG)")
    ap.add_argument("--show", action="store_true", help="show a window with overlay, score, OK/NG and FPS")
    ap.add_argument("--save", metavar="DIR", help="write overlay images here")
    ap.add_argument("--save-maps", metavar="DIR", help="write raw SxS float32 maps (.npy) here")
    ap.add_argument("--save-masks", metavar="DIR", help="write binary defect masks (PNG at the input's size) here; "
                                                        "needs a calibrated pixel threshold")
    ap.add_argument("--jsonl", metavar="FILE", help="write one JSON record per input/frame here")
    ap.add_argument("--max-frames", type=int, metavar="N", help="stop after N inputs/frames (per camera)")
    ap.add_argument("--loop", action="store_true", help="video files: start again at the end (soak tests, demos; "
                                                        "stop with Ctrl-C or --max-frames)")
    ap.add_argument("--reconnect", type=int, default=0, metavar="N",
                    help="cameras/streams: re-open up to N times when frames stop (back-off 0.5 s doubling to 30 s); "
                         "each gap is a record with error set; 0 (default): end at the first loss")
    ap.add_argument("--batch", type=int, default=None, metavar="N",
                    help="images per inference (default 1; with several cameras, one frame of each as the export's "
                         "batch range allows); files wait for a full batch, live sources take what is ready")
    ap.add_argument("--engine", metavar="FILE", help="TensorRT: which engine listed in the manifest (default: the "
                                                     "best one for this GPU)")
    ap.add_argument("--cuda-graph", action="store_true", help="TensorRT: replay the inference as a CUDA graph "
                                                              "(TensorRT-RTX: its built-in capture)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    add_station_options(ap)
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


def input_files(source) -> list[str]:
    return list(getattr(source, "paths", None) or ([source.path] if hasattr(source, "path") else []))


def input_folders(spec) -> list[tuple[str, bool]]:
    """(folder, recursive) the source lists its images from: a folder, or a glob's fixed leading folder."""
    if not isinstance(spec, str):
        return []
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return [(path, False)]
    if set("*?[") & set(path):
        head = path
        while set("*?[") & set(head):
            head = os.path.dirname(head)
        return [(head or ".", "**" in path or bool(set("*?[") & set(os.path.dirname(path))))]
    return []


def planned_outputs(options: OutputOptions, jsonl: str | None, sources: list) -> dict[str, list[str]]:
    """Every file the run will write that can be known before it starts."""
    planned = {"--jsonl": [jsonl] if jsonl else []}
    for flag, folder, ext in (("--save", options.save, ".jpg"), ("--save-maps", options.save_maps, ".npy"),
                              ("--save-masks", options.save_masks, ".png")):
        if folder:
            planned[flag] = [os.path.join(options.folder(folder, camera), stem + ext)
                             for camera, source in sources for stem in getattr(source, "stems", None) or []]
    return planned


def open_sources(config, max_frames: int | None, loop: bool) -> list:
    from ..sources import open_source

    opened = []
    try:
        for camera in config.cameras:
            opened.append((camera.name, open_source(camera.source, max_frames=max_frames,
                                                    reconnect=camera.reconnect, loop=loop)))
    except BaseException:
        for _, source in opened:
            source.close()
        raise
    return opened


def run(args) -> int:
    from ..files import JsonlAppender, probe_folder, refuse_outputs_inside, refuse_overwriting_inputs
    from ..station.station import Station
    from .staged import StagedRun

    if args.max_frames is not None and args.max_frames < 1:
        raise ClipadError("--max-frames must be at least 1")
    if args.reconnect < 0:
        raise ClipadError(f"--reconnect {args.reconnect}: must be at least 0")
    threshold = check_threshold(args.threshold)
    config = station_config(args)
    o = config.outputs
    options = OutputOptions(save=o.save, save_maps=o.save_maps, save_masks=o.save_masks, quiet=args.quiet,
                            per_camera=config.several)
    folders = {"--save": o.save, "--save-maps": o.save_maps, "--save-masks": o.save_masks}
    refuse_outputs_inside(folders, [f for c in config.cameras for f in input_folders(c.source)])
    detector = open_detector(args, engine=args.engine, cuda_graph=args.cuda_graph or None)
    station = sources = jsonl = None
    try:
        station = Station(config, detector, args.model)   # unknown classes fail here, before any camera opens
        if o.save_masks:
            missing = [c.name for c in config.cameras
                       if detector.policy.class_calibration(station.class_of(c.name)) is None]
            if missing:
                raise ClipadError(f"--save-masks needs a calibrated pixel threshold for the class of "
                                  f"{', '.join(missing)}: run edge-calibrate --model {args.model or 'DIR'} --normal "
                                  f"GOOD_IMAGES first")
        for flag, folder in folders.items():
            if folder:
                probe_folder(folder, flag)
                for camera in config.cameras if config.several else []:
                    probe_folder(os.path.join(folder, camera.name), flag)
        window = open_window() if args.show else None
        station.open_outputs()
        sources = open_sources(config, args.max_frames, args.loop)
        refuse_overwriting_inputs(planned_outputs(options, o.jsonl, sources),
                                  [p for _, source in sources for p in input_files(source)])
        jsonl = JsonlAppender(o.jsonl) if o.jsonl else None
    except BaseException:
        for _, source in sources or []:
            source.close()
        if station is not None:
            station.close(0)
        detector.close()
        raise
    lo, hi = detector.backend.batch_range
    batch = args.batch if args.batch is not None else max(1, min(len(sources), hi))
    if not args.quiet:
        warning = detector.policy.take_warning()
        if warning:
            log.warning("WARNING: %s", warning)
        for camera, source in sources:
            if source.skipped:
                log.warning("WARNING: %s: skipped %d file(s) without an image extension (%s)", camera,
                            len(source.skipped), ", ".join(os.path.basename(p) for p in source.skipped[:3]))
        log.info("model %s (%s, %s) on %s; run %s", args.model or args.triton_model, detector.kind,
                 detector.manifest.model.arch, detector.backend.description, station.run_id)
        for camera in config.cameras:
            name = station.class_of(camera.name)
            log.info("  %s: %s, class %r; %s", camera.name, redact_source(camera.source), name,
                     detector.policy.describe(name, threshold))
    detector.policy.take_warning()   # said above, or --quiet
    live = any(source.is_live for _, source in sources)
    station.reloads = live
    total = None if live or any(s.total is None for _, s in sources) else sum(s.total for _, s in sources)
    outputs = FrameOutputs(options, detector, station, live, total, window, jsonl)
    interrupted, stopped = None, False
    try:
        staged = StagedRun(detector, sources, station.class_of, threshold, batch, outputs.handle,
                           post_thread=window is None)
        stopped = staged.run()
        for camera, why in staged.lost.items():
            station.camera_lost(camera, why)
    except KeyboardInterrupt as exc:   # Ctrl-C, or SIGTERM (Terminated)
        interrupted = exc
    finally:
        for _, source in sources:
            source.close()
        outputs.close()
        leftover = station.close(o.drain_s)
        detector.close()
    if not args.quiet:
        log.info("%s%d input(s), %d unreadable%s%s", "stopped: " if interrupted is not None or stopped else "",
                 outputs.done, outputs.errors, f", {outputs.nonfinite} with non-finite model output (labelled NG)"
                 if outputs.nonfinite else "", f"; JSONL: {o.jsonl}" if o.jsonl else "")
    for line in leftover:   # every sink's delivery, said even with -q when something stayed behind
        (log.warning if "0 still spooled, 0 dropped" not in line else log.info)("%s", line)
    if isinstance(interrupted, Terminated):   # SIGTERM: 143 for every command (service managers)
        return EXIT_TERMINATED
    if interrupted is not None:   # Ctrl-C ends a camera or stream run normally; a file run was cut short
        return EXIT_OK if live else EXIT_INTERRUPTED
    if any(c.lost for c in station.state.cameras.values()):
        return EXIT_USAGE
    return EXIT_NO_INPUT if outputs.done and outputs.errors == outputs.done else EXIT_OK


def redact_source(source) -> str:
    from ..station.config import redact

    return redact(str(source))


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli("edge-detect", lambda: run(args), args.quiet)


if __name__ == "__main__":
    sys.exit(main())
