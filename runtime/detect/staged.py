"""The staged run behind ``edge-detect``: reading + preprocessing, inference and post-processing overlap on three
threads (decoders, ONNX Runtime / OpenVINO / TensorRT, OpenCV and numpy release the GIL), so the throughput is that of
the slowest stage, normally inference, instead of the sum of all three.

Results are handed to ``handle(work)`` in input order. Batches of up to ``batch`` images are formed from what the
reader has ready: file sources wait for a full batch, live sources never wait (latency first). Ctrl-C stops reading;
every frame already inferred is still handled, so outputs stay complete up to the interruption. A stop request from
``handle`` (q in the window) drops what is still queued.
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
    pred: object = None             # detector.Prediction once inferred


class StagedRun:
    def __init__(self, detector, source, class_name: str, threshold: float | None, batch: int,
                 handle: Callable[[Work], bool | None], post_thread: bool = True):
        """``handle(work)`` returns False to stop the run (e.g. q in the window); ``post_thread=False`` calls it
        on the calling thread (OpenCV windows must stay on the main thread)."""
        if batch < 1:
            raise ClipadError(f"--batch {batch}: must be at least 1")
        self.detector, self.source, self.class_name, self.threshold = detector, source, class_name, threshold
        self.batch, self.handle = batch, handle
        detector.class_index(class_name)   # an unknown class fails before any thread starts
        self.inputs: queue.Queue = queue.Queue(maxsize=2 * batch + 2)
        self.outputs: queue.Queue | None = queue.Queue(maxsize=2 * batch + 2) if post_thread else None
        self.stop = threading.Event()
        self.asked_to_stop = False
        self.failure: BaseException | None = None

    # ---- stage 1: read and preprocess -------------------------------------------------------------------------
    def _read(self) -> None:
        size = self.detector.image_size
        try:
            for frame in self.source:
                if self.stop.is_set():
                    break
                t = time.perf_counter()
                pixels, error = None, frame.error
                if error is None:
                    try:
                        pixels = prepare(frame.image, size, "bgr")
                    except ClipadError as exc:
                        error = str(exc)
                self._put(self.inputs, Work(frame, pixels, error, 1e3 * (time.perf_counter() - t)))
        except BaseException as exc:  # handed to the main thread, which raises it
            self._put(self.inputs, exc)
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
    def _next_batch(self) -> list[Work] | None:
        first = self.inputs.get()
        if first is _DONE:
            return None
        if isinstance(first, BaseException):
            raise first
        items = [first]
        while len(items) < self.batch:
            try:
                item = self.inputs.get_nowait() if self.source.is_live else self.inputs.get()
            except queue.Empty:
                break
            if item is _DONE or isinstance(item, BaseException):
                self.inputs.put(item)   # seen again by the next call
                break
            items.append(item)
        return items

    def _infer(self, items: list[Work]) -> None:
        ready = [w for w in items if w.error is None]
        if not ready:
            return
        try:
            preds = self.detector.predict_prepared(np.stack([w.pixels for w in ready]), self.class_name,
                                                   self.threshold)
        except ClipadError as exc:
            for w in ready:
                w.error = str(exc)
            return
        for w, pred in zip(ready, preds):
            pred.latency_ms["pre"] = w.pre_ms
            w.pred, w.pixels = pred, None

    def run(self) -> bool:
        """Process the whole source; True when ``handle`` asked to stop. Exceptions of any stage are raised here."""
        reader = threading.Thread(target=self._read, name="edge-detect-read", daemon=True)
        writer = threading.Thread(target=self._write, name="edge-detect-post", daemon=True) \
            if self.outputs is not None else None
        reader.start()
        if writer:
            writer.start()
        try:
            while not self.stop.is_set():
                items = self._next_batch()
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
            while reader.is_alive() and time.monotonic() < deadline:   # unblock a reader on a full queue
                try:
                    self.inputs.get(timeout=0.05)
                except queue.Empty:
                    pass
        if self.failure is not None:
            raise self.failure
        return self.asked_to_stop
