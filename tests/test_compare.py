"""The one comparator and its gate: numbers against scipy, and non-finite or constant candidate maps fail every gate
by name (in unit tests and through export-engine's FP16 gate on a sabotaged conversion)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from scipy.stats import pearsonr, spearmanr

from clipad.export import convert as precision
from clipad.runtime import precisions
from clipad.runtime.compare import PARITY_LIMITS, Comparator, GateLimits, average_ranks, compare, compare_runners, gate

PRECISION_LIMITS = {p.name: p.gate for p in precisions.PRECISIONS.values() if p.gate is not None}
from tiny_fixtures import export_one_class


def outputs(n=5, k=2, s=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, k, s, s)).astype(np.float32), rng.random((n, k)).astype(np.float32)


def test_numbers_match_scipy():
    ref = outputs()
    rng = np.random.default_rng(1)
    cand = (ref[0] + 0.3 * rng.normal(size=ref[0].shape).astype(np.float32),
            ref[1] + 0.2 * rng.normal(size=ref[1].shape).astype(np.float32))
    c = compare(ref, cand, [f"i{j}" for j in range(5)])
    for i in range(5):
        expected = min(pearsonr(ref[0][i, k].ravel(), cand[0][i, k].ravel())[0] for k in range(2))
        assert c.map_pearson[i] == pytest.approx(expected, abs=1e-6)
    assert c.map_pearson_min == pytest.approx(min(c.map_pearson), abs=1e-6)
    assert c.score_spearman == pytest.approx(min(spearmanr(ref[1][:, k], cand[1][:, k])[0] for k in range(2)))
    assert c.anomaly_map.max_abs == pytest.approx(np.abs(ref[0] - cand[0]).max())
    assert c.map_range == pytest.approx(max(np.ptp(ref[0][i, k]) for i in range(5) for k in range(2)))
    ties = np.array([3.0, 1.0, 3.0, 2.0, 1.0])
    np.testing.assert_array_equal(average_ranks(ties), [4.5, 1.5, 4.5, 3.0, 1.5])


def test_identical_outputs_pass_every_gate():
    ref = outputs()
    c = compare(ref, (ref[0].copy(), ref[1].copy()))
    assert c.map_pearson_min == 1.0 and c.score_spearman == 1.0 and c.anomaly_map.max_abs == 0.0
    for name, limits in [("parity", PARITY_LIMITS), *PRECISION_LIMITS.items()]:
        report = gate(c, limits, name, "a", "b")
        assert report.passed and report.failures == []


def test_nan_on_some_images_fails_and_names_them():
    ref = outputs()
    maps, scores = ref[0].copy(), ref[1].copy()
    maps[1, 0, 2, 2] = np.nan
    scores[3, 1] = np.inf
    c = compare(ref, (maps, scores), ["a", "b", "c", "d", "e"])
    assert c.nonfinite_images == {"reference": [], "candidate": ["b", "d"]}
    assert c.map_pearson == [1.0, 0.0, 1.0, 0.0, 1.0]  # never skipped by a nan-ignoring reduction
    for limits in (PARITY_LIMITS, *PRECISION_LIMITS.values()):
        report = gate(c, limits, "x", "a", "b")
        assert not report.passed and "non-finite candidate outputs (NaN/inf) on b, d" in report.failures[0]
    assert np.isfinite(c.anomaly_map.max_abs)  # measured on the finite images only


def test_constant_candidate_map_fails_and_is_named():
    ref = outputs()
    maps = ref[0].copy()
    maps[2, 1] = 0.25
    c = compare(ref, (maps, ref[1]), ["a", "b", "c", "d", "e"])
    assert c.constant_map_images == ["c"] and c.map_pearson[2] == 0.0
    report = gate(c, PRECISION_LIMITS["fp16"], "fp16", "a", "b")
    assert not report.passed and any("constant on one side only on c" in f for f in report.failures)
    both = compare((np.zeros((3, 1, 4, 4)), np.zeros((3, 1))), (np.zeros((3, 1, 4, 4)), np.zeros((3, 1))))
    assert both.map_pearson == [1.0, 1.0, 1.0] and both.constant_map_images == []


def test_streamed_comparison_equals_the_whole():
    """The Comparator fed in uneven batches gives exactly what one comparison of everything gives."""
    ref = outputs(n=7, seed=3)
    rng = np.random.default_rng(4)
    cand = (ref[0] + 0.1 * rng.normal(size=ref[0].shape).astype(np.float32), ref[1] * 1.01)
    cand[0][4, 1, 0, 0] = np.nan
    names = [f"i{j}" for j in range(7)]
    whole = compare(ref, cand, names)
    streamed = Comparator()
    for start, stop in ((0, 3), (3, 4), (4, 7)):
        streamed.add((ref[0][start:stop], ref[1][start:stop]), (cand[0][start:stop], cand[1][start:stop]),
                     names[start:stop])
    assert streamed.result() == whole
    assert whole.nonfinite_images["candidate"] == ["i4"] and whole.images == 7


class _Fixed:
    """A runner with given outputs and a batch range (the compare_runners contract: run(batch) -> maps, scores)."""

    def __init__(self, maps, scores, batch_range):
        self.maps, self.scores, self.batch_range, self.seen = maps, scores, batch_range, []

    def run(self, batch):
        lo, hi = self.batch_range
        assert lo <= len(batch) <= hi
        idx = batch[:, 0, 0, 0].astype(int)
        self.seen.append(len(batch))
        return self.maps[idx], self.scores[idx]


def test_compare_runners_batches_each_side_in_its_own_range():
    ref = outputs(n=5)
    images = np.zeros((5, 2, 2, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(5)
    a, b = _Fixed(*ref, (1, 1)), _Fixed(ref[0].copy(), ref[1] + 0.5, (2, 2))
    c = compare_runners(a, b, images, [f"n{i}" for i in range(5)], chunk=3)
    assert a.seen == [1] * 5 and b.seen == [2, 2, 2]   # the last chunk of 2 images holds 1 real + 1 padded image
    assert c.images == 5 and c.map_pearson_min == 1.0 and c.image_score.max_abs == pytest.approx(0.5)


def test_spearman_needs_three_images():
    ref = outputs(n=2)
    c = compare(ref, ref)
    assert c.score_spearman is None
    report = gate(c, GateLimits(score_spearman_min=0.9), "int8", "a", "b")
    assert not report.passed and "not computable" in report.failures[0]


# ---- through export-engine: a conversion that breaks some verify images must fail the FP16 gate ------------------
def sabotage(src: str, dst: str, threshold: float, mode: str) -> None:
    """The FP32 graph, plus: images whose mean pixel exceeds ``threshold`` get a NaN ("nan") or constant ("constant")
    anomaly map. Built from plain ONNX ops, so ONNX Runtime really computes it per image."""
    model = onnx.load(src)
    graph = model.graph
    producer = next(n for n in graph.node if "anomaly_map" in n.output)
    producer.output[list(producer.output).index("anomaly_map")] = "anomaly_map_raw"
    graph.initializer.extend([numpy_helper.from_array(np.array([1, 2, 3], np.int64), "sab_axes"),
                              numpy_helper.from_array(np.array(threshold, np.float32), "sab_thr"),
                              numpy_helper.from_array(np.array(0.0, np.float32), "sab_zero"),
                              numpy_helper.from_array(np.array(0.5, np.float32), "sab_half")])
    nodes = [helper.make_node("Cast", ["images"], ["sab_f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["sab_f", "sab_axes"], ["sab_mean"], keepdims=1)]
    if mode == "nan":
        nodes += [helper.make_node("Sub", ["sab_thr", "sab_mean"], ["sab_diff"]),
                  helper.make_node("Log", ["sab_diff"], ["sab_log"]),        # NaN where the image is bright
                  helper.make_node("Mul", ["sab_zero", "sab_log"], ["sab_poison"]),
                  helper.make_node("Add", ["anomaly_map_raw", "sab_poison"], ["anomaly_map"])]
    else:
        nodes += [helper.make_node("Greater", ["sab_mean", "sab_thr"], ["sab_bright"]),
                  helper.make_node("Where", ["sab_bright", "sab_half", "anomaly_map_raw"], ["anomaly_map"])]
    graph.node.extend(nodes)
    onnx.save(model, dst)


@pytest.mark.parametrize("mode", ["nan", "constant"])
def test_fp16_gate_fails_on_broken_images(tiny_files, tmp_path, monkeypatch, capsys, mode):
    verify = tmp_path / "verify"
    verify.mkdir()
    rng = np.random.default_rng(0)
    for name, level in [("dark_0", 60), ("bright_1", 200), ("dark_2", 70), ("bright_3", 190)]:
        noise = rng.integers(-20, 20, (64, 64, 3))
        Image.fromarray(np.clip(level + noise, 0, 255).astype(np.uint8)).save(verify / f"{name}.png")

    def broken_fp16(src, dst):
        sabotage(src, dst, 128.0, mode)
        return {"converter": f"SABOTAGED ({mode}) for a test"}

    monkeypatch.setattr(precision, "to_fp16", broken_fp16)
    out = tmp_path / "m"
    assert export_one_class(tiny_files, out, "clip", ["--precision", "fp16", "--no-engine",
                                                      "--verify-images", str(verify)]) == 2
    err = capsys.readouterr().err
    assert "FP16 accuracy gate failed" in err and "bright_1.png, bright_3.png" in err and "dark_" not in err
    assert not out.exists()


def test_patch_features_compared_by_token_cosine_and_gated_at_parity():
    """Models exported with --memory-features give unit patch tokens [B, T, P, C] a few-shot memory compares: the
    comparator measures each token's cosine; parity fails (naming the image) on a token that moved, NaN in them fails
    as any non-finite output, and a side without them leaves them unmeasured."""
    ref = outputs(n=3)
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(3, 2, 5, 8))
    feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
    same = compare((*ref, feats), (*ref, feats.copy()), ["a", "b", "c"])
    assert same.patch_features.cosine_min == pytest.approx(1.0) and same.patch_features.max_abs == 0.0
    assert gate(same, PARITY_LIMITS, "parity", "t", "o").passed
    moved = feats.copy()
    moved[1, 1, 3] = -moved[1, 1, 3]          # one token of image b reversed
    c = compare((*ref, feats), (*ref, moved), ["a", "b", "c"])
    assert c.patch_features.cosine == pytest.approx([1.0, -1.0, 1.0])
    assert c.patch_features.cosine_mean == pytest.approx((30 - 2) / 30)
    report = gate(c, PARITY_LIMITS, "parity", "t", "o")
    assert not report.passed and any("patch_features cosine min -1.000000" in f and "on b" in f
                                     for f in report.failures)
    assert gate(c, GateLimits(map_pearson_min=0.999), "fp16", "t", "o").passed   # recorded, not a limit there
    broken = moved.copy()
    broken[2, 0, 0, 0] = np.nan
    c = compare((*ref, feats), (*ref, broken), ["a", "b", "c"])
    assert c.nonfinite_images["candidate"] == ["c"]
    assert compare(ref, (*ref, feats)).patch_features is None
