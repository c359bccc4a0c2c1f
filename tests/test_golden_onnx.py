"""The exported ONNX graphs (ViT-L-14-336@518, seeded weights), run by ONNX Runtime through `edge-detect
--save-maps --jsonl` on the golden image files, reproduce ../shared/golden within its tolerances."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from clipad.export import cli as export_cli
from clipad.runtime.detect.cli import main as edge_detect
from conftest import CRANE_FIXTURES, GOLDEN, golden_folder, need_shared

TOL = json.loads((GOLDEN / "tolerances.json").read_text()) if GOLDEN.exists() else {}


def run_edge_detect(model, folder, tmp_path):
    maps_dir, jsonl = tmp_path / "maps", tmp_path / "r.jsonl"
    assert edge_detect(["--model", str(model), "--source", str(folder), "--backend", "onnxruntime",
                        "--save-maps", str(maps_dir), "--jsonl", str(jsonl), "-q"]) == 0
    rows = [json.loads(line) for line in open(jsonl)]
    assert all(r["error"] is None for r in rows)
    return maps_dir, rows


def assert_close(name, ours, ref, atol):
    err = float(np.abs(np.asarray(ours, np.float64) - ref).max())
    assert err <= atol, f"{name}: {err:.3e} > {atol:.3e}"


@pytest.mark.slow
def test_aaclip_onnx_via_edge_detect_matches_golden(golden_weights, tmp_path):
    g = np.load(need_shared(GOLDEN / "aaclip_seed0.npz"))
    folder, stems = golden_folder(tmp_path, g)
    model = tmp_path / "aaclip"
    assert export_cli.main(["--model", "aaclip", "--ckpt", str(golden_weights / "aaclip_ckpt"), "--clip-weights",
                            str(golden_weights / "ViT-L-14-336px-random.pt"), "--class-name", "bottle",
                            "--verify-images", str(folder), "--output", str(model), "-q"]) == 0
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["parity"]["passed"] and manifest["parity"]["comparison"]["images"] == 4
    maps_dir, rows = run_edge_detect(model, folder, tmp_path)
    tol = TOL["aaclip_seed0.npz"]
    maps = np.stack([np.load(maps_dir / f"{s}.npy") for s in stems])
    assert_close("pixel_map", maps, g["pixel_map"], tol["pixel_map"])
    assert_close("image_score_raw", [r["score"] for r in rows], g["image_score_raw"], tol["image_score_raw"])
    assert_close("map_max", [r["map_max"] for r in rows], g["pixel_map"].reshape(4, -1).max(1), tol["pixel_map"])


@pytest.mark.slow
def test_crane_onnx_via_edge_detect_matches_golden(golden_weights, tmp_path):
    g = np.load(need_shared(GOLDEN / "crane_seed0.npz"))
    folder, stems = golden_folder(tmp_path, g)
    one = tmp_path / "verify"
    one.mkdir()
    os.symlink(folder / os.listdir(folder)[0], one / "v.jpg")
    model = tmp_path / "crane"
    assert export_cli.main(["--model", "crane", "--ckpt",
                            str(need_shared(CRANE_FIXTURES / "trained_on_visa_crane_epoch_5.pth")),
                            "--clip-weights", str(golden_weights / "ViT-L-14-336px-random.pt"),
                            "--verify-images", str(one), "--output", str(model), "-q"]) == 0
    maps_dir, rows = run_edge_detect(model, folder, tmp_path)
    tol = TOL["crane_seed0.npz"]
    maps = np.stack([np.load(maps_dir / f"{s}.npy") for s in stems])
    assert_close("anomaly_map", maps, g["anomaly_map"], tol["anomaly_map"])
    assert_close("anomaly_score", [r["score"] for r in rows], g["anomaly_score"], tol["anomaly_score"])


@pytest.mark.slow
def test_vit_l_aaclip_fp16_engine_builds_with_tensorrt_rtx(golden_weights, tmp_path):
    """The FP16 ViT-L-14-336@518 AA-CLIP ONNX passes its accuracy gate and TensorRT-RTX builds it for SM 8.6,
    through the same export-engine code users run (ahead of time: no GPU needed)."""
    pytest.importorskip("tensorrt_rtx")
    g = np.load(need_shared(GOLDEN / "aaclip_seed0.npz"))
    folder, _ = golden_folder(tmp_path, g)
    one = tmp_path / "verify"
    one.mkdir()
    os.symlink(folder / sorted(os.listdir(folder))[3], one / "crack.jpg")
    model = tmp_path / "aa_fp16"
    assert export_cli.main(["--model", "aaclip", "--ckpt", str(golden_weights / "aaclip_ckpt"), "--clip-weights",
                            str(golden_weights / "ViT-L-14-336px-random.pt"), "--class-name", "bottle",
                            "--verify-images", str(one), "--precision", "fp16", "--trt-flavor", "rtx",
                            "--compute-capability", "8.6", "--output", str(model), "-q"]) == 0
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["precisions"]["fp16"]["gate"]["passed"]
    assert manifest["precisions"]["fp16"]["gate"]["comparison"]["map_pearson_min"] >= 0.999
    (engine,) = manifest["engines"]
    assert engine["file"] == "model.fp16.rtx-sm86.engine" and engine["precision"] == "fp16"
    assert (model / engine["file"]).stat().st_size == engine["bytes"] > 300e6  # ~0.6 GB of FP16 weights
