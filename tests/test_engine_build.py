"""TensorRT-RTX engine builds on this CPU (ahead of time, for chosen compute capabilities): the proof in CI that our
FP32/FP16/INT8 ONNX files build in TensorRT. Every test here needs tensorrt-rtx-cu13 (scripts/setup_env.sh)."""
from __future__ import annotations

import os

import pytest

from clipad.export import cli as export_cli
from tiny_fixtures import export_one_class as export
from tiny_fixtures import manifest_json as manifest

trt_rtx = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is installed by scripts/setup_env.sh")


def test_rtx_builds_all_three_precisions(tiny_files, tmp_path, calib_dir):
    out = tmp_path / "m"
    cache = tmp_path / "timing.cache"
    assert export(tiny_files, out, "aaclip", ["--precision", "int8", "--calib-data", str(calib_dir),
                                              "--accept-accuracy-loss",
                                              "--dynamic-batch", "1:2", "--trt-flavor", "rtx",
                                              "--compute-capability", "8.6", "--timing-cache", str(cache)]) == 0
    assert export_cli.main(["--from-onnx", str(out), "--precision", "fp32", "--trt-flavor", "rtx",
                            "--compute-capability", "8.6", "-q"]) == 0
    assert "model.fp16.onnx" not in manifest(out)["files"]
    # --from-onnx adds the missing model.fp16.onnx (gated), then builds its engine.
    assert export_cli.main(["--from-onnx", str(out), "--precision", "fp16", "--trt-flavor", "rtx",
                            "--compute-capability", "8.6", "-q"]) == 0
    m = manifest(out)
    assert m["precisions"]["fp16"]["gate"]["passed"] and "model.fp16.onnx" in m["files"]
    fp16_dir = tmp_path / "f"
    assert export(tiny_files, fp16_dir, "aaclip", ["--precision", "fp16", "--trt-flavor", "rtx",
                                                   "--compute-capability", "8.9"]) == 0
    engines = {e["file"]: e for e in m["engines"] + manifest(fp16_dir)["engines"]}
    assert set(engines) == {"model.int8.rtx-sm86.engine", "model.fp32.rtx-sm86.engine",
                            "model.fp16.rtx-sm86.engine", "model.fp16.rtx-sm89.engine"}
    for name, e in engines.items():
        folder = out if "sm86" in name else fp16_dir
        path = folder / name
        assert path.stat().st_size == e["bytes"] > 100_000
        assert e["flavor"] == "rtx" and e["trt_version"] == trt_rtx.__version__ and e["target"]["aot"]
        assert e["onnx_sha256"] == manifest(folder)["files"][e["onnx"]]["sha256"]
        assert "--from-onnx" in e["build_command"]
    assert engines["model.int8.rtx-sm86.engine"]["batch"] == {"min": 1, "max": 2, "opt": 1}
    # BF16 (the keep-list file: BF16 products, FP32 rest) builds strongly typed too, for GPUs that have BF16 kernels
    assert export_cli.main(["--from-onnx", str(out), "--precision", "bf16", "--trt-flavor", "rtx",
                            "--compute-capability", "8.6", "-q"]) == 0
    bf16 = next(e for e in manifest(out)["engines"] if e["precision"] == "bf16")
    assert bf16["file"] == "model.bf16.rtx-sm86.engine" and (out / bf16["file"]).stat().st_size == bf16["bytes"]
    assert export_cli.main(["--from-onnx", str(out), "--precision", "bf16", "--trt-flavor", "rtx",
                            "--compute-capability", "7.5", "-q"]) == 2   # Turing: no BF16 kernels
    assert cache.stat().st_size > 0
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


def test_engine_bad_inputs(tiny_files, tmp_path, capsys):
    out = tmp_path / "m"
    assert export(tiny_files, out, "clip", ["--precision", "fp16"]) == 0   # no --compute-capability: no build
    assert f"export-engine --from-onnx {out} --precision fp16" in capsys.readouterr().out
    assert manifest(out)["engines"] == []

    def fails(args, needle):
        assert export_cli.main(["--from-onnx", *args, "-q"]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1

    fails([str(out), "--precision", "int8", "--trt-flavor", "rtx", "--compute-capability", "8.6"], "--calib-data")
    fails([str(out), "--precision", "fp16", "--trt-flavor", "rtx", "--compute-capability", "8.7"], "Jetson")
    fails([str(out), "--precision", "fp16", "--trt-flavor", "rtx"], "--compute-capability")
    fails([str(out), "--precision", "fp16", "--trt-flavor", "tensorrt"], "--trt-flavor tensorrt")
    fails([str(tmp_path / "nowhere"), "--precision", "fp16"], "no such model directory")
    with open(out / "model.fp16.onnx", "r+b") as fh:
        fh.truncate(1000)
    fails([str(out), "--precision", "fp16", "--trt-flavor", "rtx", "--compute-capability", "8.6"], "sha256")
    assert not [f for f in os.listdir(out) if f.endswith(".engine")]


def test_from_onnx_adds_int8_without_torch_and_drops_stale_engines(tiny_files, tmp_path, calib_dir, monkeypatch,
                                                                   caplog):
    out = tmp_path / "m"
    assert export(tiny_files, out, "clip", ["--precision", "int8", "--calib-data", str(calib_dir),
                                            "--accept-accuracy-loss", "--trt-flavor", "rtx",
                                            "--compute-capability", "8.6"]) == 0
    before = manifest(out)
    assert [e["file"] for e in before["engines"]] == ["model.int8.rtx-sm86.engine"]
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # the precision step must not need torch
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for f in sorted(os.listdir(calib_dir))[:9]:
        os.symlink(calib_dir / f, fewer / f)
    args = ["--from-onnx", str(out), "--precision", "int8", "--calib-data", str(fewer), "--accept-accuracy-loss",
            "--no-engine", "-q"]
    assert export_cli.main(args) == 0
    after = manifest(out)
    info = after["precisions"]["int8"]["conversion"]
    assert info["calibration_images"] == 6 and info["calibration_data"] == str(fewer)  # 3 of 9 held back
    assert after["files"]["model.int8.onnx"]["sha256"] != before["files"]["model.int8.onnx"]["sha256"]
    assert after["engines"] == [] and not (out / "model.int8.rtx-sm86.engine").exists()
    assert "removed model.int8.rtx-sm86.engine" in caplog.text
    assert export_cli.main(["--from-onnx", str(out), "--precision", "fp16", "--no-engine", "-q"]) == 0
    assert manifest(out)["precisions"]["fp16"]["gate"]["passed"]
    listing = sorted(os.listdir(out))
    assert listing == [".manifest.json.lock", "manifest.json", "model.fp16.onnx", "model.int8.onnx", "model.onnx"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG truncated")
    text = (out / "manifest.json").read_text()
    assert export_cli.main(["--from-onnx", str(out), "--precision", "int8", "--calib-data", str(broken), "-q"]) == 2
    assert sorted(os.listdir(out)) == listing and (out / "manifest.json").read_text() == text




def test_device_chooses_the_gpu_to_build_for(tiny_files, tmp_path, capsys, monkeypatch):
    """--device N builds on and for GPU N: its compute capability names the engine and the build runs with it current.
    Two GPUs come from the simulated CUDA runtime (tests/simulated_cuda.py); the build itself is TensorRT-RTX's."""
    import simulated_cuda
    from clipad.runtime.backends import cuda_buffers

    out = tmp_path / "m"
    assert export(tiny_files, out, "clip", ["--precision", "fp16"]) == 0
    cuda = simulated_cuda.SimulatedCudaRuntime(gpus=[("NVIDIA RTX A2000", (8, 6)),
                                                     ("NVIDIA GeForce RTX 4090", (8, 9))])
    monkeypatch.setattr(cuda_buffers, "_rt", cuda)
    assert export_cli.main(["--from-onnx", str(out), "--precision", "fp16", "--trt-flavor", "rtx", "--device", "1",
                            "-q"]) == 0
    (engine,) = manifest(out)["engines"]
    assert engine["file"] == "model.fp16.rtx-sm89.engine"
    assert engine["target"]["gpu_name"] == "NVIDIA GeForce RTX 4090" and cuda.current_device == 1
    capsys.readouterr()
    for device, needle in (("5", "--device 5: this machine has 2 GPU(s) (0 … 1)"), ("-1", "--device -1")):
        assert export_cli.main(["--from-onnx", str(out), "--precision", "fp16", "--trt-flavor", "rtx",
                                "--device", device, "-q"]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1
