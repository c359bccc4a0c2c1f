"""Frame sources: folders with bad files, globs, single images, videos, the live-capture thread, clear errors."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

cv2 = pytest.importorskip("cv2")

from clipad.runtime.errors import ClipadError  # noqa: E402
from clipad.runtime.sources import Frame, LiveCapture, open_source  # noqa: E402

H, W = 24, 32


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg
    return msg


def bgr_image(seed: int = 0) -> np.ndarray:
    img = np.zeros((H, W, 3), np.uint8)
    img[:, :, 0] = 200  # blue-ish in BGR: lets us check channel order
    img[:, :, 2] = 20
    img[H // 2:, :, 1] = 120 + seed
    return img


@pytest.fixture
def mixed_folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    assert cv2.imwrite(str(d / "a_good.jpg"), bgr_image())
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128  # red, half transparent
    Image.fromarray(rgba, "RGBA").save(d / "b_rgba.png")
    Image.fromarray(np.full((H, W), 77, np.uint8), "L").save(d / "c_grey.png")
    assert cv2.imwrite(str(d / "d_16bit.png"), np.full((H, W), 40000, np.uint16))
    (d / "e_empty.jpg").write_bytes(b"")
    jpeg = (d / "a_good.jpg").read_bytes()
    (d / "f_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (d / "g_notes.txt").write_text("not an image\n")
    (d / ".hidden.png").write_bytes(b"")  # dotfiles are skipped
    (d / "subdir").mkdir()                # folders are not recursed into
    assert cv2.imwrite(str(d / "subdir" / "nested.png"), bgr_image())
    return d


GOOD = {"a_good", "b_rgba", "c_grey", "d_16bit"}
BAD = {"e_empty", "f_truncated"}


def write_video(path, n: int = 12, size=(W, H)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, size)
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG/.avi (no video encoder available)")
    for i in range(n):
        writer.write(np.full((size[1], size[0], 3), (i * 20) % 256, np.uint8))
    writer.release()
    cap = cv2.VideoCapture(str(path))
    ok = cap.isOpened() and cap.read()[0]
    cap.release()
    if not ok:
        pytest.skip("this OpenCV build cannot read back the MJPG/.avi it wrote (no video decoder available)")


@pytest.fixture
def video(tmp_path):
    path = tmp_path / "clip.avi"
    write_video(path, n=12)
    return path


def test_folder_every_image_file_one_frame(mixed_folder):
    with open_source(str(mixed_folder)) as src:
        assert src.total == 6 and not src.is_live
        assert [os.path.basename(p) for p in src.skipped] == ["g_notes.txt"]   # no image extension: skipped, said
        frames = list(src)
    stems = [f.stem for f in frames]
    assert stems == sorted(GOOD | BAD)  # sorted, one each, no hidden file, no subfolder
    for f in frames:
        assert isinstance(f, Frame) and f.frame is None
        assert os.path.dirname(f.source) == str(mixed_folder)
        if f.stem in GOOD:
            assert f.error is None
            assert f.image.dtype == np.uint8 and f.image.shape == (H, W, 3) and f.image.flags.c_contiguous
        else:
            assert f.image is None
            assert f.error and "\n" not in f.error and os.path.basename(f.source) in f.error
    by = {f.stem: f for f in frames}
    # BGR order: the blue JPEG stays blue in channel 0; the red RGBA PNG is red in channel 2.
    assert by["a_good"].image[..., 0].mean() > 150 > by["a_good"].image[..., 2].mean()
    assert (by["b_rgba"].image[..., 2] > 200).all() and (by["b_rgba"].image[..., 0] < 50).all()
    assert (by["c_grey"].image == 77).all()
    assert (by["d_16bit"].image == 40000 >> 8).all()  # 16-bit keeps its top 8 bits
    assert "empty" in by["e_empty"].error
    assert "truncated" in by["f_truncated"].error


def test_folder_is_reiterable_and_max_frames(mixed_folder):
    src = open_source(str(mixed_folder), max_frames=3)
    assert src.total == 3
    assert [f.stem for f in src] == ["a_good", "b_rgba", "c_grey"]
    assert [f.stem for f in src] == ["a_good", "b_rgba", "c_grey"]


def test_glob_sorted_matches(mixed_folder):
    src = open_source(str(mixed_folder / "*.png"))
    assert [f.stem for f in src] == ["b_rgba", "c_grey", "d_16bit"]  # no .hidden.png
    assert [f.stem for f in open_source(str(mixed_folder / "?_*.jpg"))] == ["a_good", "e_empty", "f_truncated"]


def test_duplicate_stems_get_distinct_names(tmp_path):
    for ext in ("png", "jpg"):
        assert cv2.imwrite(str(tmp_path / f"part.{ext}"), bgr_image())
    stems = [f.stem for f in open_source(str(tmp_path))]
    assert len(set(stems)) == 2 and all(s.startswith("part") for s in stems)


def test_single_image(tmp_path):
    path = tmp_path / "one.png"
    assert cv2.imwrite(str(path), bgr_image())
    src = open_source(str(path))
    frames = list(src)
    assert src.total == 1 and len(frames) == 1
    f = frames[0]
    assert f.stem == "one" and f.frame is None and f.error is None and f.source == str(path)
    np.testing.assert_array_equal(f.image, bgr_image())  # PNG is lossless: exact BGR round trip


def test_single_bad_image_is_an_error_record_not_a_raise(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (f,) = list(open_source(str(path)))
    assert f.image is None and f.error and "broken.png" in f.error


@pytest.mark.parametrize("spec, match", [
    ("{tmp}/does_not_exist.png", "no such file"),
    ("{tmp}/nothing_here_*.png", "no image files"),
    ("{tmp}/missing_video.mp4", "no such file"),
])
def test_missing_inputs_raise_one_line(tmp_path, spec, match):
    with pytest.raises(ClipadError) as e:
        open_source(spec.format(tmp=tmp_path))
    assert match in one_line(e)


def test_empty_folder_raises(tmp_path):
    (tmp_path / ".only_hidden").write_text("x")
    with pytest.raises(ClipadError, match="no image files"):
        open_source(str(tmp_path))


def test_undecodable_video_raises(tmp_path):
    path = tmp_path / "junk.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ClipadError) as e:
        open_source(str(path))
    assert "junk.mp4" in one_line(e) and "could not be decoded" in one_line(e)


def test_video_every_frame_in_order(video):
    with open_source(str(video)) as src:
        assert not src.is_live and src.total == 12
        frames = list(src)
    assert [f.frame for f in frames] == list(range(12))
    assert [f.stem for f in frames] == [f"clip_{i:06d}" for i in range(12)]
    assert all(f.source == str(video) and f.error is None for f in frames)
    assert all(f.image.shape == (H, W, 3) and f.image.dtype == np.uint8 for f in frames)
    means = [float(f.image.mean()) for f in frames]
    assert all(abs(m - (i * 20) % 256) < 8 for i, m in enumerate(means))  # sequential, nothing dropped


def test_video_max_frames(video):
    src = open_source(str(video), max_frames=5)
    assert src.total == 5
    frames = list(src)
    assert [f.frame for f in frames] == [0, 1, 2, 3, 4]
    assert frames[-1].stem == "clip_000004"
    src.close()
    src.close()  # idempotent


def test_live_capture_thread_on_a_video(tmp_path):
    path = tmp_path / "cam.avi"
    write_video(path, n=60)
    cap = LiveCapture(str(path), name="camera0")
    assert cap.is_live and cap.total is None
    frames = list(cap)  # ends by itself when the "stream" runs out
    assert frames, "live capture yielded nothing"
    idx = [f.frame for f in frames]
    assert idx == sorted(set(idx)) and all(0 <= i < 60 for i in idx)  # strictly increasing capture indices
    assert all(f.stem == f"camera0_{f.frame:06d}" for f in frames)
    assert all(f.image.shape == (H, W, 3) and f.error is None for f in frames)
    # the yielded image is the one captured at that index (frame i was filled with (i*20) % 256)
    assert all(abs(float(f.image.mean()) - (f.frame * 20) % 256) < 8 for f in frames)
    assert cap.frames_read == 60 and cap.frames_dropped == 60 - len(frames)
    cap.close()
    assert not cap.alive


class PacedCapture:
    """A real cv2.VideoCapture whose read() takes ``delay`` seconds, like a camera at a fixed frame rate."""

    def __init__(self, arg, delay: float = 0.005):
        self.cap, self.delay = cv2.VideoCapture(arg), delay

    def isOpened(self):
        return self.cap.isOpened()

    def read(self):
        time.sleep(self.delay)
        return self.cap.read()

    def release(self):
        self.cap.release()


def test_live_capture_drops_old_frames_for_a_slow_consumer(tmp_path, monkeypatch):
    import clipad.runtime.sources as sources

    path = tmp_path / "cam.avi"
    write_video(path, n=200)
    monkeypatch.setattr(sources, "_quiet_videocapture", PacedCapture)
    with LiveCapture(str(path), max_frames=3) as cap:
        it = iter(cap)
        first = next(it)
        time.sleep(0.3)  # consumer is slow: the thread reads ~60 frames meanwhile and keeps only the newest
        second = next(it)
        assert second.frame > first.frame + 10
        assert cap.frames_dropped >= 10
        rest = list(it)
        assert len(rest) == 1 and rest[0].frame > second.frame  # max_frames=3 in all
        assert cap.alive  # the 200-frame "stream" is still running
    assert not cap.alive  # __exit__ → close() joined the thread


def test_live_capture_close_midstream(tmp_path):
    path = tmp_path / "cam.avi"
    write_video(path, n=200)
    src = LiveCapture(str(path), name="cam")
    next(iter(src))
    src.close()
    assert not src.alive


def test_live_source_for_missing_camera(tmp_path):
    with pytest.raises(ClipadError) as e:
        open_source(99)
    assert one_line(e) == "camera 99 could not be opened (no such device?)"
    with pytest.raises(ClipadError, match="camera 98 could not be opened"):
        open_source("98")


def test_unreachable_stream_hides_password(monkeypatch):
    import clipad.runtime.sources as sources

    class Closed:
        def __init__(self, arg):
            self.arg = arg

        def isOpened(self):
            return False

        def release(self):
            pass

    monkeypatch.setattr(sources, "_quiet_videocapture", Closed)
    with pytest.raises(ClipadError) as e:
        open_source("rtsp://admin:secret@10.0.0.9:554/live")
    msg = one_line(e)
    assert "stream could not be opened" in msg and "secret" not in msg and "10.0.0.9" in msg


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, clipad.runtime.sources, clipad.runtime.render; print('cv2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_gstreamer_source_without_gstreamer_is_one_line(monkeypatch):
    from clipad.runtime import sources

    monkeypatch.setattr(sources, "opencv_has_gstreamer", lambda: False)
    with pytest.raises(ClipadError, match=r"--source gst:…: this OpenCV is built without GStreamer.*python3-opencv"):
        open_source("gst:videotestsrc ! appsink")
    with pytest.raises(ClipadError, match="gst: needs a GStreamer pipeline, e.g. 'gst:nvarguscamerasrc"):
        open_source("gst:   ")


def test_gstreamer_pipeline_gets_an_appsink_and_the_gstreamer_api(monkeypatch):
    import cv2

    from clipad.runtime import sources

    opened = []

    class Recorder:
        def __init__(self, arg, **kw):
            opened.append((arg, kw))

    monkeypatch.setattr(sources, "opencv_has_gstreamer", lambda: True)
    monkeypatch.setattr(sources, "LiveCapture", Recorder)
    open_source("gst:videotestsrc  is-live=true ! video/x-raw,width=64")
    open_source("gst:v4l2src device=/dev/video0 ! videoconvert ! appsink drop=1", reconnect=3)
    (first, kw1), (second, kw2) = opened
    assert first == f"videotestsrc is-live=true ! video/x-raw,width=64 ! {sources.GST_SINK}"
    assert kw1["api"] == cv2.CAP_GSTREAMER and kw1["name"] == "gst_videotestsrc"
    assert kw1["source"] == "gst:" + first
    assert second == "v4l2src device=/dev/video0 ! videoconvert ! appsink drop=1" and kw2["reconnect"] == 3


def test_an_open_that_never_returns_is_one_line_after_the_open_timeout(monkeypatch):
    """OpenCV 4.6 blocks for ever on a GStreamer pipeline whose source element is misspelt (a source-less pipeline
    never prerolls): the open is abandoned after ``open_timeout`` and said in one line."""
    from clipad.runtime import sources

    release = threading.Event()

    def hangs(arg, api=None):
        release.wait(30)
        raise AssertionError("the abandoned opener must not be waited for")

    monkeypatch.setattr(sources, "_quiet_videocapture", hangs)
    started = time.monotonic()
    with pytest.raises(ClipadError) as e:
        LiveCapture("nosuchelement ! videoconvert ! appsink", source="gst:nosuch", open_timeout=0.3,
                    open_error="gst:nosuch: GStreamer could not start this pipeline")
    release.set()
    assert time.monotonic() - started < 5
    assert one_line(e) == "gst:nosuch: GStreamer could not start this pipeline (no answer within 0.3 s)"


def test_an_exception_while_opening_reaches_the_caller(monkeypatch):
    from clipad.runtime import sources

    def broken(arg, api=None):
        raise OSError("device busy")

    monkeypatch.setattr(sources, "_quiet_videocapture", broken)
    with pytest.raises(OSError, match="device busy"):
        LiveCapture(7)
