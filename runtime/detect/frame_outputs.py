"""What ``edge-detect`` does with one result, in the order results come: maps, regions and masks, the overlay (file,
window, live view, evidence), the JSONL record, the station's counters and sinks, the progress bar."""
from __future__ import annotations

import datetime
import logging
import math
import os
import sys
import time
from dataclasses import dataclass

from .. import render

log = logging.getLogger("clipad")


@dataclass
class OutputOptions:
    save: str | None = None          # overlays
    save_maps: str | None = None     # raw S×S maps (.npy)
    save_masks: str | None = None    # defect masks at the input's size (.png)
    quiet: bool = False
    per_camera: bool = False         # several cameras: a sub-folder per camera

    def folder(self, folder: str, camera: str) -> str:
        return os.path.join(folder, camera) if self.per_camera else folder


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _finite_or_none(value):
    return value if value is None or math.isfinite(value) else None


def record(frame, class_name: str, pred=None, error: str | None = None, post_ms: float = 0.0,
           regions: list | None = None, pixel_label: str | None = None, camera: str = "cam0", seq: int = 0,
           run: str = "") -> dict:
    """The JSONL (and MQTT, webhook) record of one input or frame (strict JSON: non-finite numbers are null).
    (run, camera, seq) identifies it: delivery to sinks is at least once."""
    lat = dict(pred.latency_ms) if pred else {"pre": None, "infer": None, "post": None}
    if pred:
        lat["post"] = lat["post"] + post_ms
        lat = {k: round(v, 3) for k, v in lat.items()}

    def value(name):
        return None if pred is None else _finite_or_none(getattr(pred, name))

    return {"time": _now(), "run": run, "camera": camera, "seq": seq, "source": frame.source, "frame": frame.frame,
            "class_name": class_name, "score": value("score"), "decision_score": value("decision_score"),
            "normalized_score": value("normalized_score"), "p_value": value("p_value"), "map_max": value("map_max"),
            "fewshot_max": value("fewshot_max"),
            "label": None if pred is None else pred.label, "pixel_label": pixel_label, "regions": regions,
            "calibration": None if pred is None else pred.calibration, "latency_ms": lat,
            "error": error if error is not None or pred is None else pred.error}


class FrameOutputs:
    def __init__(self, options: OutputOptions, detector, station, live: bool, total: int | None, window, jsonl):
        self.options, self.detector, self.station, self.window, self.jsonl = options, detector, station, window, jsonl
        self.live = live
        self.progress = None
        if not options.quiet and not live:
            from tqdm import tqdm

            self.progress = tqdm(total=total, unit="img", dynamic_ncols=True, file=sys.stderr)
        self.done = self.errors = self.nonfinite = 0

    def handle(self, work) -> bool:
        opts, frame, pred, error, camera = self.options, work.frame, work.pred, work.error, work.camera
        state = self.station.state.cameras[camera]
        regions, pixel_label, post_ms, keep_going, overlay, mask = None, None, 0.0, True, None, None
        if pred is not None:
            t = time.perf_counter()
            if opts.save_maps:
                render.save_npy_atomic(os.path.join(opts.folder(opts.save_maps, camera), frame.stem + ".npy"),
                                       pred.anomaly_map)
                if pred.fewshot_map is not None:   # the few-shot part of the fused map beside it
                    render.save_npy_atomic(os.path.join(opts.folder(opts.save_maps, camera),
                                                        frame.stem + ".fewshot.npy"), pred.fewshot_map)
            if pred.pixel_threshold is not None and pred.error is None:
                height, width = frame.image.shape[:2]
                pixel_label = "NG" if pred.map_max >= pred.pixel_threshold else "OK"
                mask, regions = render.find_regions(pred.anomaly_map, pred.pixel_threshold, width, height,
                                                    ensure_peak="NG" in (pred.label, pixel_label))
                if frame.original_size:   # decoded reduced: report and write in the original's pixels
                    regions = render.scale_regions(regions, frame.original_size[0] / width)
                if opts.save_masks:
                    render.save_image_atomic(os.path.join(opts.folder(opts.save_masks, camera), frame.stem + ".png"),
                                             render.resize_mask(mask, frame.original_size))
            if opts.save or self.window is not None or self.station.wants_overlay(camera, pred.label == "NG"):
                overlay = self._overlay(work, state, mask)
                keep_going = self._show(overlay, camera, frame)
            post_ms = 1e3 * (time.perf_counter() - t)
            if pred.error is not None:
                self.nonfinite += 1
                log.debug("%s: %s", frame.source, pred.error)
        else:
            self.errors += 1
            log.debug("%s: %s", frame.source, error)
        row = record(frame, work.class_name or state.class_name, pred, error, post_ms, regions, pixel_label,
                     camera, state.next_seq(), self.station.run_id)
        if self.jsonl:
            self.jsonl.write(row)
        self.station.after(row, frame.image, overlay, mask)
        self.done += 1
        if self.progress is not None:
            self.progress.update(1)
        return keep_going

    def _overlay(self, work, state, mask):
        pred = work.pred
        lines = [f"{work.class_name}: score {pred.score:.4f}  map max {pred.map_max:.4f}"]
        if pred.p_value is not None:
            lines.append(f"decision {pred.decision_score:.4f}  p {pred.p_value:.3f}")
        if pred.label:
            lines.append(pred.label)
        if self.live:
            lines.append(f"{work.camera}  {state.fps:.1f} FPS")
        low, high = self.detector.policy.display_range(work.class_name, pred.anomaly_map)
        return render.overlay(work.frame.image, pred.anomaly_map, low, high, text_lines=lines, label=pred.label,
                              region_mask=mask)

    def _show(self, shown, camera: str, frame) -> bool:
        if self.options.save:
            render.save_image_atomic(os.path.join(self.options.folder(self.options.save, camera),
                                                  frame.stem + ".jpg"), shown)
        if self.window is not None:
            self.window.imshow("edge-detect", shown)
            if self.window.waitKey(1) & 0xFF in (ord("q"), 27):
                return False
        return True

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.jsonl:
            self.jsonl.close()
        if self.window is not None:
            self.window.destroyAllWindows()
