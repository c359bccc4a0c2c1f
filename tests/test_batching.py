"""Every supported batch setting runs: fixed --batch N (1, 2, 4) and --dynamic-batch MIN:MAX, through
Detector.predict, Detector.predict_batch and edge-detect, with the same numbers as a batch-1 export."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from clipad.runtime.batching import chunks, pad_batch, run_batched
from clipad.runtime.detect.cli import main as edge_detect
from clipad.runtime.detector import Detector
from tiny_fixtures import export_tiny

SETTINGS = {"batch1": ["--batch", "1"], "batch2": ["--batch", "2"], "batch4": ["--batch", "4"],
            "dynamic2to3": ["--dynamic-batch", "2:3"]}


@pytest.fixture(scope="module")
def exports(tiny_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("batches")
    for name, args in SETTINGS.items():
        assert export_tiny(tiny_files, root / name, "clip", args) == 0
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8) for i in range(5)]
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i}.png")
    return folder, images


def reference(exports, images):
    with Detector.open(str(exports / "batch1")) as det:
        return [det.predict(im) for im in images]


@pytest.mark.parametrize("setting", ["batch2", "batch4", "dynamic2to3"])
def test_predict_and_predict_batch(exports, inputs, setting):
    _, images = inputs
    ref = reference(exports, images)
    with Detector.open(str(exports / setting)) as det:
        lo, hi = det.backend.batch_range
        assert (lo, hi) == {"batch2": (2, 2), "batch4": (4, 4), "dynamic2to3": (2, 3)}[setting]
        one = det.predict(images[0])
        for n in (1, 2, 3, 5):   # below, at and above the batch range, and a tail that needs padding
            preds = det.predict_batch(images[:n])
            assert len(preds) == n
            for p, r in zip(preds, ref):
                np.testing.assert_allclose(p.anomaly_map, r.anomaly_map, rtol=1e-5, atol=1e-6)
                assert p.score == pytest.approx(r.score, abs=1e-6)
    np.testing.assert_allclose(one.anomaly_map, ref[0].anomaly_map, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_edge_detect(exports, inputs, tmp_path, setting):
    folder, images = inputs
    jsonl = tmp_path / "r.jsonl"
    assert edge_detect(["--model", str(exports / setting), "--source", str(folder), "--jsonl", str(jsonl),
                        "--save-maps", str(tmp_path / "maps"), "-q"]) == 0
    rows = [json.loads(line) for line in open(jsonl)]
    assert len(rows) == 5 and all(r["error"] is None for r in rows)
    ref = reference(exports, images)
    for i, (row, r) in enumerate(zip(rows, ref)):
        assert row["score"] == pytest.approx(r.score, abs=1e-6)
        np.testing.assert_allclose(np.load(tmp_path / "maps" / f"{i}.npy"), r.anomaly_map, rtol=1e-5, atol=1e-6)


def test_run_batched_pads_and_trims():
    data = np.arange(7)[:, None] * np.ones((7, 3))
    seen = []

    def model(batch):
        seen.append(len(batch))
        return batch * 2, batch.sum(axis=1)

    doubled, sums = run_batched(model, data, 2, 3)
    assert seen == [3, 3, 2]  # the tail of 1 is padded up to the minimum of 2
    np.testing.assert_array_equal(doubled, data * 2)
    np.testing.assert_array_equal(sums, data.sum(axis=1))
    seen.clear()
    run_batched(model, data[:1], 4, 4)
    assert seen == [4]
    assert [(len(c), n) for c, n in chunks(data, 4, 4)] == [(4, 4), (4, 3)]
    np.testing.assert_array_equal(pad_batch(data[:1], 3), np.repeat(data[:1], 3, axis=0))
    with pytest.raises(ValueError):
        run_batched(model, data[:0], 1, 1)
