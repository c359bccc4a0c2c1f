"""The staged edge-detect run: results in input order with any batch, stages overlapping (checked from event
timestamps with a FAKE slow backend, not timed), stop requests and failures of any stage, and batches from live
sources that never wait."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from clipad.runtime.backends.base import Backend
from clipad.runtime.cli import main as edge_detect
from clipad.runtime.detector import Detector
from clipad.runtime.errors import ClipadError
from clipad.runtime.pipeline import StagedRun
from clipad.runtime.sources import Frame, ImageFiles, Source
from tiny_fixtures import export_tiny


@pytest.fixture(scope="module")
def model_dir(tiny_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "clip"
    assert export_tiny(tiny_files, out, "clip", ["--dynamic-batch", "1:4"]) == 0
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("in")
    rng = np.random.default_rng(3)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "3_broken.png").write_bytes(b"broken")
    return root


class SlowFakeBackend(Backend):
    """FAKE backend for tests: the real one, plus a sleep per run and a log of when each run started and ended."""

    name = "fake-slow"

    def __init__(self, real: Backend, seconds: float):
        self.real, self.seconds, self.events = real, seconds, []

    @property
    def description(self):
        return "FAKE slow " + self.real.description

    @property
    def batch_range(self):
        return self.real.batch_range

    def run(self, batch_u8):
        start = time.monotonic()
        time.sleep(self.seconds)
        out = self.real.run(batch_u8)
        self.events.append((start, time.monotonic(), len(batch_u8)))
        return out


@pytest.mark.parametrize("batch", [1, 3, 4])
def test_order_and_numbers_with_any_batch(model_dir, folder, batch):
    seen = []
    with Detector.open(str(model_dir)) as det:
        StagedRun(det, ImageFiles(sorted(str(p) for p in folder.iterdir())), det.class_names[0], None, batch,
                  seen.append).run()
        names = [w.frame.source.rsplit("/", 1)[1] for w in seen]
        assert names == sorted(p.name for p in folder.iterdir())
        broken = next(w for w in seen if "broken" in w.frame.source)
        assert broken.pred is None and "broken" in broken.error
        for w in seen:
            if w.pred is not None:
                ref = det.predict(w.frame.image, color_order="bgr")
                np.testing.assert_allclose(w.pred.anomaly_map, ref.anomaly_map, rtol=1e-5, atol=1e-6)


def test_inference_and_post_processing_overlap(model_dir, folder):
    posts = []

    def slow_post(work):
        start = time.monotonic()
        time.sleep(0.06)
        posts.append((start, time.monotonic()))

    with Detector.open(str(model_dir)) as det:
        det.backend = SlowFakeBackend(det.backend, 0.06)
        StagedRun(det, ImageFiles(sorted(str(p) for p in folder.glob("[0-9].png"))), det.class_names[0], None, 1,
                  slow_post).run()
        infers = det.backend.events
    assert len(infers) == len(posts) == 7
    # post-processing of frame i runs while frame i+1 is inferred
    overlapping = sum(posts[i][0] < infers[i + 1][1] and infers[i + 1][0] < posts[i][1] for i in range(6))
    assert overlapping >= 4
    with Detector.open(str(model_dir)) as det:   # without the post thread nothing overlaps
        det.backend = SlowFakeBackend(det.backend, 0.02)
        posts.clear()
        StagedRun(det, ImageFiles(sorted(str(p) for p in folder.glob("[0-9].png"))), det.class_names[0], None, 1,
                  slow_post, post_thread=False).run()
        infers = det.backend.events
    assert not any(posts[i][0] < infers[i + 1][1] and infers[i + 1][0] < posts[i][1] for i in range(6))


def test_stop_request_and_failures_end_the_run(model_dir, folder):
    seen = []
    with Detector.open(str(model_dir)) as det:
        run = StagedRun(det, ImageFiles(sorted(str(p) for p in folder.iterdir())), det.class_names[0], None, 1,
                        lambda w: seen.append(w) or len(seen) < 2)
        assert run.run() is True and len(seen) == 2

        def failing(work):
            raise ClipadError("disk full")

        with pytest.raises(ClipadError, match="disk full"):
            StagedRun(det, ImageFiles(sorted(str(p) for p in folder.iterdir())), det.class_names[0], None, 2,
                      failing).run()

        class Exploding(Source):
            total = None

            def __iter__(self):
                yield Frame("a", None, np.zeros((10, 10, 3), np.uint8), None, "a")
                raise ClipadError("camera unplugged")

        with pytest.raises(ClipadError, match="camera unplugged"):
            StagedRun(det, Exploding(), det.class_names[0], None, 1, lambda w: None).run()
    assert threading.active_count() < 10   # no stage threads left behind


class TrickleLive(Source):
    """A live source whose frames arrive 50 ms apart."""
    is_live = True
    total = None

    def __iter__(self):
        for i in range(4):
            time.sleep(0.05)
            yield Frame("live", i, np.full((20, 20, 3), 60 * i, np.uint8), None, f"live_{i}")


def test_live_batches_never_wait(model_dir):
    with Detector.open(str(model_dir)) as det:
        det.backend = SlowFakeBackend(det.backend, 0.0)
        StagedRun(det, TrickleLive(), det.class_names[0], None, 4, lambda w: None).run()
        sizes = [n for _, _, n in det.backend.events]
    assert sum(sizes) == 4 and sizes[0] == 1


def test_edge_detect_batch_gives_the_same_records(model_dir, folder, tmp_path):
    rows = {}
    for batch in ("1", "3"):
        jsonl = tmp_path / f"{batch}.jsonl"
        assert edge_detect(["--model", str(model_dir), "--source", str(folder), "--batch", batch, "--jsonl",
                            str(jsonl), "-q"]) == 0
        rows[batch] = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["source"] for r in rows["1"]] == [r["source"] for r in rows["3"]]
    for a, b in zip(rows["1"], rows["3"]):
        assert (a["score"] is None) == (b["score"] is None)
        if a["score"] is not None:
            assert a["score"] == pytest.approx(b["score"], abs=1e-6)
    assert edge_detect(["--model", str(model_dir), "--source", str(folder), "--batch", "0", "-q"]) == 2
