"""edge-detect end to end on a tiny exported model: sources, JSONL schema, bad inputs, torch-free runtime."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from clipad.export import cli as export_cli
from clipad.runtime.detect.cli import main as edge_detect
from clipad.runtime.detector import Detector
from tiny_fixtures import TINY, write_video

KEYS = {"time", "source", "frame", "class_name", "score", "decision_score", "normalized_score", "p_value", "map_max",
        "fewshot_max", "label", "regions", "latency_ms", "error", "pixel_label", "calibration", "run", "camera", "seq"}


@pytest.fixture(scope="module")
def model_dir(tiny_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "aa"
    assert export_cli.main(["--model", "aaclip", "--arch", TINY, "--image-size", "56", "--clip-weights",
                            str(tiny_files["state_dict"]), "--ckpt", str(tiny_files["aaclip"]),
                            "--class-name", "bottle", "screw", "--output", str(out), "-q"]) == 0
    return out


def read_jsonl(path):
    rows = [json.loads(line) for line in open(path)]
    for row in rows:
        assert set(row) == KEYS and set(row["latency_ms"]) == {"pre", "infer", "post"}
    return rows


def bad_folder(root):
    root.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "a_good.jpg")
    Image.fromarray(rgb).convert("RGBA").save(root / "b_rgba.png")
    Image.fromarray(rgb).convert("L").save(root / "c_grey.png")
    Image.fromarray((rng.integers(0, 65535, (40, 50))).astype(np.uint16)).save(root / "d_16bit.png")
    (root / "e_empty.jpg").write_bytes(b"")
    data = (root / "a_good.jpg").read_bytes()
    (root / "f_truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "g_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    (root / "h_notes.txt").write_text("not an image")
    Image.new("1", (12000, 10000)).save(root / "i_huge.png")  # 120 Mpx: refused as a decompression bomb
    return root


def test_bad_input_folder_continues_and_reports(model_dir, tmp_path):
    folder = bad_folder(tmp_path / "in")
    jsonl = tmp_path / "r.jsonl"
    rc = edge_detect(["--model", str(model_dir), "--source", str(folder), "--jsonl", str(jsonl), "--save",
                      str(tmp_path / "ov"), "--save-maps", str(tmp_path / "maps"), "-q"])
    assert rc == 0
    rows = read_jsonl(jsonl)   # the folder's files with an image extension, every one a record (notes.txt is not)
    assert [os.path.basename(r["source"]) for r in rows] == sorted(set(os.listdir(folder)) - {"h_notes.txt"})
    ok = {os.path.basename(r["source"]) for r in rows if r["error"] is None}
    assert ok == {"a_good.jpg", "b_rgba.png", "c_grey.png", "d_16bit.png"}
    for r in rows:
        if r["error"] is None:
            assert isinstance(r["score"], float) and r["class_name"] == "bottle" and r["frame"] is None
            assert all(v >= 0 for v in r["latency_ms"].values())
        else:
            assert r["score"] is None and "\n" not in r["error"] and os.path.basename(r["source"]) in r["error"]
    huge = next(r for r in rows if r["source"].endswith("i_huge.png"))
    assert "too large" in huge["error"]
    maps = sorted(os.listdir(tmp_path / "maps"))
    assert maps == ["a_good.npy", "b_rgba.npy", "c_grey.npy", "d_16bit.npy"]
    assert np.load(tmp_path / "maps" / "a_good.npy").shape == (56, 56)
    assert sorted(os.listdir(tmp_path / "ov")) == ["a_good.jpg", "b_rgba.jpg", "c_grey.jpg", "d_16bit.jpg"]


def test_saved_map_equals_python_api_and_class_selection(model_dir, tmp_path):
    img = np.random.default_rng(1).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "x.png")
    assert edge_detect(["--model", str(model_dir), "--source", str(tmp_path / "x.png"), "--class-name", "screw",
                        "--save-maps", str(tmp_path / "m"), "--jsonl", str(tmp_path / "r.jsonl"), "-q"]) == 0
    with Detector.open(str(model_dir)) as det:
        pred = det.predict(str(tmp_path / "x.png"), class_name="screw")
        other = det.predict(img, class_name="bottle")
    assert np.array_equal(np.load(tmp_path / "m" / "x.npy"), pred.anomaly_map)
    row = read_jsonl(tmp_path / "r.jsonl")[0]
    assert row["class_name"] == "screw" and row["score"] == pytest.approx(pred.score, abs=0)
    assert row["map_max"] == pytest.approx(float(pred.anomaly_map.max()))
    assert not np.array_equal(pred.anomaly_map, other.anomaly_map)


def test_threshold_gives_ok_ng(model_dir, tmp_path):
    folder = bad_folder(tmp_path / "in")
    jsonl = tmp_path / "r.jsonl"
    assert edge_detect(["--model", str(model_dir), "--source", str(folder / "*.png"), "--threshold", "0.5",
                        "--jsonl", str(jsonl), "-q"]) == 0
    rows = [r for r in read_jsonl(jsonl) if r["error"] is None]
    assert rows and all(r["label"] == ("NG" if r["score"] >= 0.5 else "OK") for r in rows)


def test_video_source_frames(model_dir, tmp_path):
    rng = np.random.default_rng(2)
    path = write_video(tmp_path / "line.avi", [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(5)])
    jsonl = tmp_path / "v.jsonl"
    assert edge_detect(["--model", str(model_dir), "--source", path, "--jsonl", str(jsonl), "--save-maps",
                        str(tmp_path / "maps"), "--max-frames", "4", "-q"]) == 0
    rows = read_jsonl(jsonl)
    assert [r["frame"] for r in rows] == [0, 1, 2, 3] and all(r["error"] is None for r in rows)
    assert sorted(os.listdir(tmp_path / "maps")) == [f"line_{i:06d}.npy" for i in range(4)]


@pytest.mark.parametrize("problem", ["no_manifest", "hash_mismatch", "unknown_class", "missing_camera",
                                     "bad_url", "missing_source", "no_display", "tensorrt_no_engine",
                                     "tensorrt_without_gpu", "nan_threshold", "device_without_gpu"])
def test_fatal_errors_are_one_line(model_dir, tmp_path, capsys, problem, monkeypatch):
    import shutil

    model = str(model_dir)
    args = ["--source", str(tmp_path)]
    if problem == "no_manifest":
        model = str(tmp_path)
    elif problem == "hash_mismatch":
        copy = tmp_path / "copy"
        shutil.copytree(model_dir, copy)
        with open(copy / "model.onnx", "r+b") as fh:
            fh.seek(-100, 2)
            fh.write(b"\0" * 10)
        model = str(copy)
    elif problem == "unknown_class":
        args += ["--class-name", "bottel"]
    elif problem == "missing_camera":
        args = ["--camera", "97"]
    elif problem == "bad_url":
        args = ["--source", "rtsp://127.0.0.1:9/nothing"]
    elif problem == "missing_source":
        args = ["--source", str(tmp_path / "nope.png")]
    elif problem == "no_display":
        monkeypatch.delenv("DISPLAY", raising=False)
        monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
        args += ["--show"]
    elif problem == "tensorrt_no_engine":
        args += ["--backend", "tensorrt"]
    elif problem in ("tensorrt_without_gpu", "device_without_gpu"):
        from clipad.runtime.backends import cuda_buffers

        if cuda_buffers.gpu_info() is not None:
            pytest.skip("this machine has a GPU")
        model = str(with_listed_engine(model_dir, tmp_path / "with_engine"))
        args += ["--backend", "tensorrt"] + (["--device", "1"] if problem == "device_without_gpu" else [])
    elif problem == "nan_threshold":
        args += ["--threshold", "nan"]
    assert edge_detect(["--model", model, *args, "--jsonl", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edge-detect: error:") and "Traceback" not in err[0]
    expected = {"no_manifest": "manifest.json", "hash_mismatch": "sha256", "unknown_class": "bottel",
                "missing_camera": "camera 97", "bad_url": "could not be opened", "missing_source": "nope.png",
                "no_display": "--show", "tensorrt_no_engine": "lists no TensorRT engine",
                "tensorrt_without_gpu": "no CUDA GPU/driver found", "device_without_gpu": "no CUDA GPU/driver found",
                "nan_threshold": "--threshold nan: must be a finite number"}[problem]
    assert expected in err[0]


def with_listed_engine(model_dir, copy):
    """A copy of the model whose manifest lists an engine (for sm 8.6; the file itself is never reached)."""
    import shutil

    from clipad.runtime.manifest import BatchRange, EngineEntry, EngineTarget, Manifest

    shutil.copytree(model_dir, copy)
    manifest = Manifest.read(str(copy))
    manifest.engines.append(EngineEntry(file="model.fp16.rtx-sm86.engine", precision="fp16", flavor="rtx",
                                        trt_version="1.7.1.116", target=EngineTarget("8.6", aot=True),
                                        sha256="0" * 64, bytes=1, batch=BatchRange(1, 1, 1)))
    manifest.write(str(copy))
    return copy


def test_runtime_works_where_torch_cannot_be_imported(model_dir, tmp_path):
    """A fake `torch` package that raises on import, first on the path: the runtime and the CLI still work."""
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('torch is not available on this edge box')\n")
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "z.png")
    env = dict(os.environ, PYTHONPATH=str(fake))
    code = textwrap.dedent(f"""
        import sys
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("fake torch was importable")
        import clipad.runtime
        from clipad.runtime.detector import Detector
        from clipad.runtime.detect.cli import main
        rc = main(["--model", {str(model_dir)!r}, "--source", {str(tmp_path / 'z.png')!r},
                   "--jsonl", {str(tmp_path / 'z.jsonl')!r}, "-q"])
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        raise SystemExit(rc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "z.jsonl").read_text())["error"] is None
    exe = os.path.join(os.path.dirname(sys.executable), "edge-detect")
    proc = subprocess.run([exe, "--model", str(model_dir), "--source", str(tmp_path / "z.png"), "-q"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_ctrl_c_stops_cleanly_with_outputs_flushed(model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    calls = {"n": 0}
    original = Detector.run_raw

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(Detector, "run_raw", interrupted)
    jsonl = tmp_path / "r.jsonl"
    rc = edge_detect(["--model", str(model_dir), "--source", str(folder), "--jsonl", str(jsonl),
                      "--save-maps", str(tmp_path / "maps"), "-q"])
    assert rc == 130
    rows = read_jsonl(jsonl)  # every line complete and parseable
    assert [os.path.basename(r["source"]) for r in rows] == ["0.png", "1.png"]
    assert sorted(os.listdir(tmp_path / "maps")) == ["0.npy", "1.npy"]


def test_sigterm_flushes_like_ctrl_c_and_exits_143(model_dir, tmp_path):
    """SIGTERM (a service manager stopping the run) writes what was inferred, like Ctrl-C, and exits 143 as the
    README's exit codes say."""
    import signal
    import time

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(400):
        Image.fromarray(np.full((20, 20, 3), i % 250, np.uint8)).save(folder / f"{i:03d}.png")
    jsonl = tmp_path / "r.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "clipad.runtime.detect.cli", "--model", str(model_dir), "--source",
                             str(folder), "--jsonl", str(jsonl), "-q"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while (not jsonl.exists() or len(jsonl.read_text().splitlines()) < 3) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, proc.stderr.read()
    rows = read_jsonl(jsonl)
    assert 3 <= len(rows) < 400 and all(r["error"] is None for r in rows)
