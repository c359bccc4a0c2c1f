"""Frame sources for ``edge-detect``: still images, folders, globs, video files, cameras and network streams.

Every source yields :class:`Frame` records. Bad still images never raise: they come out as a Frame with
``image=None`` and a one-line ``error`` so a folder run carries on. Problems with the source itself (missing path,
empty glob, a camera or stream that will not open, an undecodable video) raise :class:`ClipadError` at open.

Live sources (camera, stream) read on a daemon thread that keeps only the newest frame, so a slow consumer sees
bounded latency instead of a growing backlog; video files are read sequentially, every frame.
cv2 is imported lazily so ``import clipad.runtime`` stays light.
"""
from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import ClipadError
from .inputs import GLOB_CHARS, list_images, read_bgr

VIDEO_EXTS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"})
URL_PREFIXES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://")
GST_PREFIX = "gst:"
# Appended to a pipeline that does not end in an appsink: OpenCV reads BGR frames from an appsink, and a live view
# wants the newest frame, not a queue.
GST_SINK = "videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1 sync=false"
NO_GSTREAMER = ("this OpenCV is built without GStreamer (the index's opencv-python-headless never has it): on a "
                "Jetson use JetPack's OpenCV (a venv made with --system-site-packages, and pip uninstall "
                "opencv-python-headless); on Debian/Ubuntu apt install python3-opencv gstreamer1.0-plugins-base "
                "gstreamer1.0-plugins-good the same way")


@dataclass
class Frame:
    source: str                  # file path, or the camera / url / video string
    frame: int | None            # frame index for videos, cameras and streams; None for still images
    image: np.ndarray | None     # BGR uint8 HxWx3, or None when the input could not be read
    error: str | None            # one-line reason when image is None
    stem: str                    # name for output files: "<file stem>" or "<video stem>_<frame:06d>"
    original_size: tuple[int, int] | None = None   # (width, height) of a still image reduced on decoding


class Source:
    """Iterable of :class:`Frame`; ``total`` is the item count when known (None for live), usable with ``with``."""

    total: int | None = None
    is_live: bool = False
    skipped: list[str] = []     # files of a folder or glob left out (no image extension)

    def __iter__(self) -> Iterator[Frame]:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _redact(url: str) -> str:
    """Hide a password in ``scheme://user:pass@host`` so it never reaches messages or file names."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://[^/@:]*):[^/@]*@", r"\1:***@", url)


def _safe_name(text: str) -> str:
    """A file-name stem from any text: Unicode kept (検査 stays 検査), only path separators, control characters and
    leading/trailing dots replaced."""
    cleaned = re.sub(r"[\x00-\x1f\x7f/\\]+", "_", text).strip(". ")
    return cleaned or "stream"


def _quiet_videocapture(arg, api: int | None = None):
    """cv2.VideoCapture(arg[, api]) without OpenCV's WARN lines on stderr (we raise our own one-line error)."""
    import cv2

    try:
        logging = cv2.utils.logging
        old = logging.getLogLevel()
        logging.setLogLevel(logging.LOG_LEVEL_ERROR)
    except Exception:  # logging API differs across builds; warnings are only cosmetic
        logging = old = None
    try:
        return cv2.VideoCapture(arg) if api is None else cv2.VideoCapture(arg, api)
    finally:
        if logging is not None:
            logging.setLogLevel(old)


def _unique_stems(paths: list[str]) -> list[str]:
    """File stems, falling back to the full name (then a counter) where two files would share one output name."""
    stems = [Path(p).stem for p in paths]
    dup = {s for s in stems if stems.count(s) > 1}
    names = [Path(p).name if s in dup else s for p, s in zip(paths, stems)]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(n if k == 0 else f"{n}_{k}")
    return out


class ImageFiles(Source):
    """A list of still-image paths; each yields exactly one Frame (errors included). Re-iterable."""

    def __init__(self, paths: list[str], max_frames: int | None = None):
        self.paths = list(paths) if max_frames is None else list(paths)[: max(0, max_frames)]
        self.stems = _unique_stems(self.paths)
        self.total = len(self.paths)

    def __iter__(self) -> Iterator[Frame]:
        for path, stem in zip(self.paths, self.stems):
            image, error, original = read_bgr(path)
            yield Frame(source=path, frame=None, image=image, error=error, stem=stem, original_size=original)


class VideoFile(Source):
    """Sequential reader over every frame of a video file (single pass, or again from the start with ``loop``)."""

    def __init__(self, path: str, max_frames: int | None = None, loop: bool = False):
        import cv2

        self.path, self.name, self.max_frames, self.loop = path, _safe_name(Path(path).stem), max_frames, loop
        self._cap = _quiet_videocapture(path)
        first = None
        if self._cap.isOpened():
            ok, first = self._cap.read()
            first = first if ok else None
        if first is None:
            self._cap.release()
            raise ClipadError(f"{path}: video could not be decoded (corrupt file or unsupported codec)")
        self._first = first
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.total = self.promised = count if count > 0 else None
        if loop:
            self.total = None
        if max_frames is not None:
            self.total = max(0, max_frames) if self.total is None else min(self.total, max(0, max_frames))

    def __iter__(self) -> Iterator[Frame]:
        import cv2

        index = in_pass = 0
        while self._cap is not None and (self.max_frames is None or index < self.max_frames):
            if self._first is not None:
                image, self._first = self._first, None
            else:
                ok, image = self._cap.read()
                if (not ok or image is None) and self.loop and in_pass > 0:
                    self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    in_pass = 0
                    ok, image = self._cap.read()
                if not ok or image is None:
                    if self.promised and in_pass < self.promised:
                        yield Frame(source=self.path, frame=index, image=None, stem=f"{self.name}_{index:06d}",
                                    error=f"{self.path}: video ended after {in_pass} of the {self.promised} frames its "
                                          f"header promises (truncated or damaged)")
                    break
            yield Frame(source=self.path, frame=index, image=image, error=None, stem=f"{self.name}_{index:06d}")
            index += 1
            in_pass += 1
        self.close()

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class LiveCapture(Source):
    """Camera / stream reader: a daemon thread keeps only the newest frame; iteration yields the newest unseen one.

    ``capture_arg`` is anything ``cv2.VideoCapture`` accepts (camera index, URL, even a file path, which the tests
    use). When ``max_read_failures`` reads in a row fail, the capture is re-opened up to ``reconnect`` times with a
    doubling back-off (``backoff`` seconds first, at most 30 s); every gap yields a Frame with ``error`` set. Iteration
    stops after ``max_frames`` frames, ends when the capture ends and no reconnect is left (raising ClipadError with a
    summary if reconnects were allowed), or raises ClipadError when no frame arrives for ``frame_timeout`` seconds.
    """

    is_live = True
    total = None

    def __init__(self, capture_arg, name: str | None = None, max_frames: int | None = None,
                 open_error: str | None = None, source: str | None = None, max_read_failures: int = 25,
                 frame_timeout: float | None = 10.0, reconnect: int = 0, backoff: float = 0.5,
                 api: int | None = None, open_timeout: float = 20.0):
        self.source = source if source is not None else _redact(str(capture_arg))
        if name is None:
            name = f"camera{capture_arg}" if isinstance(capture_arg, int) else Path(str(capture_arg)).stem
        self.name = _safe_name(name)
        self.max_frames, self.max_read_failures, self.frame_timeout = max_frames, max_read_failures, frame_timeout
        self._arg, self._api, self.reconnect, self.backoff = capture_arg, api, max(0, int(reconnect)), backoff
        self.open_timeout = open_timeout
        self.reconnects = 0          # re-opens so far
        self.gave_up = False
        self._events: list[str] = []  # gap messages for the iterator, in order
        self._cap = self._open()
        if self._cap is None:
            raise ClipadError(f"{open_error or self.source + ': could not be opened'} (no answer within "
                              f"{open_timeout:g} s)")
        if not self._cap.isOpened():
            self._cap.release()
            raise ClipadError(open_error or f"{self.source}: could not be opened")
        self._cond = threading.Condition()
        self._latest: tuple[int, np.ndarray] | None = None
        self._ended = False
        self._stop = threading.Event()
        self.frames_read = 0     # frames read by the capture thread
        self.frames_dropped = 0  # frames overwritten before anyone took them
        self._taken = -1
        self._thread = threading.Thread(target=self._run, name=f"clipad-capture-{self.name}", daemon=True)
        self._thread.start()

    def _open(self):
        """The capture, or None when opening did not return within ``open_timeout`` seconds.

        OpenCV can block for ever while opening: a GStreamer pipeline whose source element is misspelt parses into a
        source-less pipeline that never prerolls, a network camera that accepts the connection and sends nothing.
        The opener runs in a daemon thread; one that never returns is abandoned (it cannot be cancelled)."""
        box: list = []

        def opener() -> None:
            try:
                box.append(_quiet_videocapture(self._arg) if self._api is None
                           else _quiet_videocapture(self._arg, self._api))
            except BaseException as exc:  # handed to the caller's thread below
                box.append(exc)

        thread = threading.Thread(target=opener, name=f"clipad-open-{self.name}", daemon=True)
        thread.start()
        thread.join(self.open_timeout)
        if box and isinstance(box[0], BaseException):
            raise box[0]
        return box[0] if box else None

    def _reopen(self) -> bool:
        """Re-open the capture after it stopped delivering; False when no reconnect is left (or stopping)."""
        while self.reconnects < self.reconnect and not self._stop.is_set():
            self.reconnects += 1
            wait = min(30.0, self.backoff * 2 ** (self.reconnects - 1))
            self._event(f"{self.source}: no frames; reconnect {self.reconnects}/{self.reconnect} in {wait:g} s")
            if self._stop.wait(wait):
                return False
            self._cap.release()
            cap = self._open()
            if cap is None:
                self._event(f"{self.source}: re-opening gave no answer within {self.open_timeout:g} s")
                continue
            self._cap = cap
            if self._cap.isOpened():
                self._event(f"{self.source}: reconnected (attempt {self.reconnects})")
                return True
        self.gave_up = self.reconnect > 0
        return False

    def _event(self, message: str) -> None:
        with self._cond:
            self._events.append(message)
            self._cond.notify_all()

    def _run(self) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                ok, image = self._cap.read()
                if not ok or image is None:
                    failures += 1
                    if failures >= self.max_read_failures:
                        if not self._reopen():
                            break
                        failures = 0
                        continue
                    time.sleep(0.01)
                    continue
                failures = 0
                with self._cond:
                    if self._latest is not None and self._latest[0] > self._taken:
                        self.frames_dropped += 1
                    self._latest = (self.frames_read, image)
                    self.frames_read += 1
                    self._cond.notify_all()
        finally:
            self._cap.release()  # the thread owns the capture: never released under a blocked read()
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def __iter__(self) -> Iterator[Frame]:
        yielded = 0
        while self.max_frames is None or yielded < self.max_frames:
            deadline = None if self.frame_timeout is None else time.monotonic() + self.frame_timeout
            with self._cond:
                while not ((self._latest is not None and self._latest[0] > self._taken) or self._ended
                           or self._events):
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0 and self.reconnect == 0:
                        raise ClipadError(f"{self.source}: no frame received for {self.frame_timeout:g} s "
                                          "(stream stalled or camera disconnected?)")
                    self._cond.wait(timeout=0.5 if left is None or left <= 0 else min(0.5, left))
                events, self._events = self._events, []
                fresh = self._latest is not None and self._latest[0] > self._taken
                if fresh:
                    index, image = self._latest
                    self._taken = index
            for message in events:   # each gap is a record with error set
                yield Frame(source=self.source, frame=None, image=None, error=message, stem=f"{self.name}_gap")
            if fresh:
                yield Frame(source=self.source, frame=index, image=image, error=None,
                            stem=f"{self.name}_{index:06d}")
                yielded += 1
            elif self._ended and not events:
                break
        if self.gave_up:
            raise ClipadError(f"{self.source}: stream lost; gave up after {self.reconnect} reconnect attempt(s) "
                              f"({self.frames_read} frames received)")

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the capture thread and wait for it (it releases the capture on the way out)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)


def opencv_has_gstreamer() -> bool:
    """Whether OpenCV can open a GStreamer pipeline here (built in, or a plugin that loads; OpenCV 5 lists plugin
    backends in getBackends() even when the plugin is absent, so that list alone is not proof)."""
    import cv2

    try:
        from cv2 import videoio_registry

        return bool(videoio_registry.hasBackend(cv2.CAP_GSTREAMER))
    except Exception:  # builds without hasBackend: the build summary says it
        return bool(re.search(r"GStreamer:\s*YES", cv2.getBuildInformation()))


def open_gstreamer(pipeline: str, max_frames: int | None, reconnect: int, flag: str = "--source") -> LiveCapture:
    """``gst:PIPELINE`` through OpenCV's GStreamer backend (``nvarguscamerasrc`` for a Jetson's CSI camera)."""
    import cv2

    pipeline = " ".join(pipeline.split())
    if not pipeline:
        raise ClipadError(f"{flag} gst: needs a GStreamer pipeline, e.g. 'gst:nvarguscamerasrc sensor-id=0 ! "
                          "video/x-raw(memory:NVMM),width=1920,height=1080,framerate=30/1 ! nvvidconv ! "
                          "video/x-raw,format=BGRx'")
    if not opencv_has_gstreamer():
        raise ClipadError(f"{flag} gst:…: {NO_GSTREAMER}")
    if not re.search(r"\bappsink\b", pipeline):
        pipeline = f"{pipeline} ! {GST_SINK}"
    first = _safe_name(pipeline.split("!")[0].split()[0])
    shown = GST_PREFIX + pipeline
    return LiveCapture(pipeline, name=f"gst_{first}", source=shown, max_frames=max_frames, api=cv2.CAP_GSTREAMER,
                       open_error=f"{shown}: GStreamer could not start this pipeline (a missing element or plugin, "
                                  "or the camera is busy? try it with gst-launch-1.0)", reconnect=reconnect)


def open_source(spec: str | int, max_frames: int | None = None, reconnect: int = 0, loop: bool = False,
                flag: str = "--source") -> Source:
    """Open ``spec``: camera index (int or digits), rtsp/http(s) URL, ``gst:PIPELINE``, video file, image file, folder
    or glob.
    ``reconnect``: how many times a camera or stream that stops delivering is re-opened."""
    if reconnect < 0:
        raise ClipadError(f"--reconnect {reconnect}: must be at least 0")
    if max_frames is not None and max_frames < 0:
        raise ClipadError(f"max_frames must be >= 0, got {max_frames}")
    if isinstance(spec, bool) or not isinstance(spec, (int, str, os.PathLike)):
        raise ClipadError(f"unsupported source {spec!r}: give a path, folder, glob, camera index or URL")
    if isinstance(spec, str) and spec.strip().isdigit():
        spec = int(spec.strip())
    if isinstance(spec, int):
        if spec < 0:   # OpenCV segfaults on some negative indices
            raise ClipadError(f"camera {spec}: camera indices start at 0")
        return LiveCapture(spec, name=f"camera{spec}", source=f"camera{spec}", max_frames=max_frames,
                           open_error=f"camera {spec} could not be opened (no such device?)", reconnect=reconnect)
    text = os.fspath(spec)
    if not text.strip():
        raise ClipadError("empty source: give a path, folder, glob, camera index or URL")
    if text.startswith(GST_PREFIX):
        return open_gstreamer(text[len(GST_PREFIX):], max_frames, reconnect, flag)
    if text.lower().startswith(URL_PREFIXES):
        shown = _redact(text)
        name = "stream_" + _safe_name(re.sub(r"^[^:]*://([^@/]*@)?", "", text))[:60]
        return LiveCapture(text, name=name, source=shown, max_frames=max_frames,
                           open_error=f"{shown}: stream could not be opened (wrong address, or unreachable?)",
                           reconnect=reconnect)
    path = os.path.expanduser(text)
    if os.path.isfile(path) and Path(path).suffix.lower() in VIDEO_EXTS:
        return VideoFile(path, max_frames, loop)
    if os.path.isdir(path) or os.path.isfile(path) or GLOB_CHARS & set(path):
        listing = list_images(path, flag)
        source = ImageFiles(listing.paths, max_frames)
        source.skipped = listing.skipped
        return source
    raise ClipadError(f"{flag} {text}: no such file, folder, glob, camera index or URL")
