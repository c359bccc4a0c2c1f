"""The staged run behind ``edge-detect``: reading + preprocessing (one thread per camera), inference and
post-processing overlap (decoders, ONNX Runtime / OpenVINO / TensorRT, OpenCV and numpy release the GIL), so the
throughput is that of the slowest stage, normally inference, instead of the sum of all three.

Results are handed to ``handle(work)`` in the order they were inferred (per camera, in input order). Batches of up to
``batch`` images are formed from what the readers have ready, across cameras: file sources wait for a full batch, live
sources never wait (latency first). Ctrl-C stops reading; every frame already inferred is still handled, so outputs
stay complete up to the interruption. A stop request from ``handle`` (q in the window) drops what is still queued.
With one camera a failing source ends the run (its error is raised); with several, that camera alone ends (its
``lost`` entry says why) and the others go on.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import ClipadError
from ..preprocess import prepare

_DONE = object()


@dataclass
class Work:
    frame: object                   # sources.Frame
    pixels: np.ndarray | None       # the model input [S, S, 3] uint8, None when the frame is unusable
    error: str | None
    pre_ms: float
    camera: str = "cam0"
    class_name: str = ""            # the class this camera reported when the frame was inferred
    pred: object = None             # detector.Prediction once inferred


class StagedRun:
    def __init__(self, detector, sources, class_of: Callable[[str], str] | str, threshold: float | None,
                 batch: int, handle: Callable[[Work], bool | None], post_thread: bool = True):
        """``sources``: a Source, or [(camera name, Source), …]; ``class_of(camera)`` (or one class name) says which
        class a camera reports, asked for every batch (changeovers apply to the next frame). ``handle(work)``
        returns False to stop the run; ``post_thread=False`` calls it on the calling thread (OpenCV windows must stay
        on the main thread)."""
        if batch < 1:
            raise ClipadError(f"--batch {batch}: must be at least 1")
        self.sources = [("cam0", sources)] if not isinstance(sources, (list, tuple)) else list(sources)
        self.class_of = (lambda camera, fixed=class_of: fixed) if isinstance(class_of, str) else class_of
        for camera, _ in self.sources:   # an unknown class fails before any thread starts
            detector.class_index(self.class_of(camera))
        self.detector, self.threshold, self.batch, self.handle = detector, threshold, batch, handle
        self.live = any(source.is_live for _, source in self.sources)
        size = 2 * max(batch, len(self.sources)) + 2
        self.inputs: queue.Queue = queue.Queue(maxsize=size)
        self.outputs: queue.Queue | None = queue.Queue(maxsize=size) if post_thread else None
        self.stop = threading.Event()
        self.asked_to_stop = False
        self.failure: BaseException | None = None
        self.lost: dict[str, str] = {}    # camera -> why its source ended with an error (several cameras)

    # ---- stage 1: read and preprocess (a thread per camera) ------------------------------------------------------
    def _read(self, camera: str, source) -> None:
        size = self.detector.image_size
        try:
            for frame in source:
                if self.stop.is_set():
                    break
                t = time.perf_counter()
                pixels, error = None, frame.error
                if error is None:
                    try:
                        pixels = prepare(frame.image, size, "bgr")
                    except ClipadError as exc:
                        error = str(exc)
                self._put(self.inputs, Work(frame, pixels, error, 1e3 * (time.perf_counter() - t), camera))
        except BaseException as exc:  # one camera: handed to the main thread; several: that camera ends
            if len(self.sources) == 1 or not isinstance(exc, ClipadError):
                self._put(self.inputs, exc)
            else:
                self.lost[camera] = str(exc)
        finally:
            self._put(self.inputs, _DONE)

    def _put(self, q: queue.Queue, item) -> None:
        while True:
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                if self.stop.is_set() and item is not _DONE:
                    return

    # ---- stage 3: post-process (own thread) ---------------------------------------------------------------------
    def _write(self) -> None:
        while True:
            work = self.outputs.get()
            if work is _DONE:
                return
            if self.failure is not None or self.asked_to_stop:   # a quit request drops what is still queued
                continue
            try:
                if self.handle(work) is False:
                    self.asked_to_stop = True
                    self.stop.set()
            except BaseException as exc:
                self.failure = exc
                self.stop.set()

    # ---- stage 2: infer (calling thread) -------------------------------------------------------------------------
    def _next_batch(self, running: list[int]) -> list[Work] | None:
        """Up to ``batch`` items; None when every reader is done. ``running`` counts the readers still going."""
        items: list[Work] = []
        while len(items) < self.batch and running[0]:
            try:
                item = self.inputs.get_nowait() if items and self.live else self.inputs.get()
            except queue.Empty:
                break
            if item is _DONE:
                running[0] -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            items.append(item)
        return items or None

    def _infer(self, items: list[Work]) -> None:
        ready = [w for w in items if w.error is None]
        for w in items:
            w.class_name = self.class_of(w.camera)
        if not ready:
            return
        try:
            preds = self.detector.predict_prepared(np.stack([w.pixels for w in ready]),
                                                   [w.class_name for w in ready], self.threshold)
        except ClipadError as exc:
            for w in ready:
                w.error = str(exc)
            return
        for w, pred in zip(ready, preds):
            pred.latency_ms["pre"] = w.pre_ms
            w.pred, w.pixels = pred, None

    def run(self) -> bool:
        """Process every source; True when ``handle`` asked to stop. Exceptions of any stage are raised here."""
        readers = [threading.Thread(target=self._read, args=(camera, source), name=f"edge-detect-read-{camera}",
                                    daemon=True) for camera, source in self.sources]
        writer = threading.Thread(target=self._write, name="edge-detect-post", daemon=True) \
            if self.outputs is not None else None
        for reader in readers:
            reader.start()
        if writer:
            writer.start()
        running = [len(readers)]
        try:
            while not self.stop.is_set():
                items = self._next_batch(running)
                if items is None:
                    break
                self._infer(items)
                for work in items:
                    if self.outputs is not None:
                        self._put(self.outputs, work)
                    elif self.handle(work) is False:
                        self.asked_to_stop = True
                        self.stop.set()
                        break
        finally:
            self.stop.set()
            if writer:
                self.outputs.put(_DONE)
                writer.join()
            deadline = time.monotonic() + 5.0   # a stalled stream must not hold the exit forever
            while any(r.is_alive() for r in readers) and time.monotonic() < deadline:
                try:   # unblock readers on a full queue
                    self.inputs.get(timeout=0.05)
                except queue.Empty:
                    pass
        if self.failure is not None:
            raise self.failure
        return self.asked_to_stop
