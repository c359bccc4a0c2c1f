"""The staged edge-detect run: results in input order with any batch, stages overlapping, stop requests and failures
of any stage, and batches from live sources that never wait. Overlap and "never waits" are proven with events (a
FAKE instrumented backend): a stage that did not overlap, or a batcher that waited, would block and the test fails;
nothing depends on how fast this machine is."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from PIL import Image

from clipad.runtime.backends.base import Backend
from clipad.runtime.detect.cli import main as edge_detect
from clipad.runtime.detect.staged import StagedRun
from clipad.runtime.detector import Detector
from clipad.runtime.errors import ClipadError
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


class InstrumentedFakeBackend(Backend):
    """FAKE backend for tests: the real one, plus an event per inference run (set when run i starts) and the batch
    sizes it was given."""

    name = "fake-instrumented"

    def __init__(self, real: Backend):
        self.real, self.image_size, self.precision = real, real.image_size, real.precision
        self.started = [threading.Event() for _ in range(64)]
        self.sizes: list[int] = []

    @property
    def description(self):
        return "FAKE instrumented " + self.real.description

    @property
    def batch_range(self):
        return self.real.batch_range

    def _infer(self, batch_u8):
        self.started[len(self.sizes)].set()
        self.sizes.append(len(batch_u8))
        return self.real.run(batch_u8)


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
    """Post-processing of frame i waits until inference of frame i+1 has started: with a post-processing thread that
    happens (the stages overlap), without one it cannot (post runs on the inference thread)."""
    files = sorted(str(p) for p in folder.glob("[0-9].png"))
    overlapped = []

    def post_waiting_for_the_next_inference(work):
        i = int(work.frame.stem)
        if i + 1 < len(files):
            overlapped.append(fake.started[i + 1].wait(timeout=20 if threaded else 0.3))

    for threaded in (True, False):
        overlapped.clear()
        with Detector.open(str(model_dir)) as det:
            fake = det.backend = InstrumentedFakeBackend(det.backend)
            StagedRun(det, ImageFiles(files), det.class_names[0], None, 1, post_waiting_for_the_next_inference,
                      post_thread=threaded).run()
        assert len(overlapped) == len(files) - 1
        assert all(overlapped) if threaded else not any(overlapped)


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


class GatedLive(Source):
    """A live source that delivers frame i+1 only after the model ran frame i: a batcher that waited for a full
    batch would never get the next frame."""
    is_live = True
    total = None

    def __init__(self, fake: InstrumentedFakeBackend):
        self.fake = fake

    def __iter__(self):
        for i in range(4):
            if i:
                assert self.fake.started[i - 1].wait(timeout=20), "the batcher waited for more live frames"
            yield Frame("live", i, np.full((20, 20, 3), 60 * i, np.uint8), None, f"live_{i}")


def test_live_batches_never_wait(model_dir):
    with Detector.open(str(model_dir)) as det:
        fake = det.backend = InstrumentedFakeBackend(det.backend)
        StagedRun(det, GatedLive(fake), det.class_names[0], None, 4, lambda w: None).run()
    assert fake.sizes == [1, 1, 1, 1]


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
