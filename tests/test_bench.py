"""edge-bench on a tiny model: the row schema, skipped rows with their reasons, accuracy columns and gates, the INT8
variant picked for the CPU, batch rows, the report files, and bad arguments. Nothing here asserts a speed."""
from __future__ import annotations

import json

import numpy as np
import pytest

from clipad.benchmarks.bench_cli import main as edge_bench
from clipad.benchmarks.latency import Row, not_applicable
from tiny_fixtures import export_tiny

KEYS = {"backend", "precision", "batch", "status", "reason", "device", "runs", "p50_ms", "p90_ms", "p99_ms",
        "batch_p50_ms", "throughput_ips", "stages_ms", "peak_rss_mb", "map_pearson", "score_max_abs", "gate", "check",
        "gflops", "of_ceiling", "fewshot_rows", "fewshot_rss_mb"}


@pytest.fixture(scope="module")
def model(tiny_files, tmp_path_factory):
    """A tiny AA-CLIP export whose int8-cpu file failed its gate (a limit no file can meet) and was kept: the bench's
    gate column must say so, whatever these few images show."""
    import dataclasses

    from clipad.runtime import precisions
    from clipad.runtime.compare import GateLimits

    out = tmp_path_factory.mktemp("bench") / "aa"
    real = precisions.PRECISIONS["int8-cpu"]
    precisions.PRECISIONS["int8-cpu"] = dataclasses.replace(real, gate=GateLimits(map_pearson_min=1.5))
    try:
        assert export_tiny(tiny_files, out, "aaclip", ["--dynamic-batch", "1:2", "--precision", "int8-cpu",
                                                       "--accept-accuracy-loss"]) == 0
    finally:
        precisions.PRECISIONS["int8-cpu"] = real
    from clipad.export import cli as export_cli

    assert export_cli.main(["--from-onnx", str(out), "--precision", "bf16", "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def report(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert edge_bench(["--model", str(model), "--backends", "torch,onnxruntime,openvino,tensorrt", "--precisions",
                       "fp32,bf16,int8", "--batch", "1,2", "--iters", "2", "--json", str(out / "b.json"),
                       "--markdown", str(out / "b.md"), "--plot", str(out / "b.png"), "-q"]) == 0
    return json.loads((out / "b.json").read_text()), out


def rows(report_, backend, precision, batch=1):
    return next(r for r in report_["rows"] if (r["backend"], r["precision"], r["batch"]) == (backend, precision, batch))


def test_row_schema_and_environment(report):
    data, out = report
    assert len(data["rows"]) == 4 * 3 * 2 and all(set(r) == KEYS for r in data["rows"])
    assert {"cpu", "cpu_flags", "cores", "versions", "threads", "gpu"} <= set(data["env"])
    assert "onnxruntime" in data["env"]["versions"]
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    for r in ok:
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["throughput_ips"] > 0 and r["peak_rss_mb"] > 50
        assert set(r["stages_ms"]) == {"pre", "infer", "post"} and r["map_pearson"] is not None
    assert (out / "b.png").stat().st_size > 10_000 and "| onnxruntime | fp32 | 1 | ok" in (out / "b.md").read_text()


def test_skipped_rows_say_why(report):
    data, _ = report
    assert "no BF16 path" in rows(data, "onnxruntime", "bf16")["reason"]
    assert "reference runs fp32" in rows(data, "torch", "int8")["reason"]
    trt = rows(data, "tensorrt", "fp32")
    if data["env"]["gpu"] is None:
        assert trt["status"] == "skipped" and "need a GPU" in trt["reason"]
    assert "no model.int8.onnx" in rows(data, "openvino", "int8")["reason"]
    for r in data["rows"]:
        assert (r["status"] == "ok") == (r["reason"] is None)


def test_accuracy_columns_and_variant(report):
    data, _ = report
    torch_row = rows(data, "torch", "fp32")
    assert torch_row["status"] == "ok" and torch_row["map_pearson"] > 0.99999 and torch_row["score_max_abs"] < 1e-5
    assert torch_row["gate"] is None                        # the reference has no export gate
    int8 = rows(data, "onnxruntime", "int8")
    assert int8["runs"] == "int8-cpu" and "int8-cpu" in int8["device"]   # the INT8 model made for CPUs was picked
    assert int8["gate"] == "accepted"                       # what export-engine recorded for that file
    assert 0.9 < int8["map_pearson"] < 1.0
    bf16 = rows(data, "openvino", "bf16")
    assert bf16["status"] == "ok" and bf16["gate"] == "passed" and bf16["check"] in ("passed", "failed")
    assert bf16["map_pearson"] > 0.9, "BF16 maps are not finite or not the model's (a stale compiled-model cache?)"
    assert rows(data, "onnxruntime", "fp32", 2)["status"] == "ok"
    autocast = rows(data, "torch", "bf16")                  # torch.autocast(bfloat16): its own row, not the file's gate
    assert autocast["status"] == "ok" and "(autocast)" in autocast["device"] and autocast["gate"] is None
    assert autocast["check"] in ("passed", "failed") and autocast["map_pearson"] > 0.9


def test_check_column_holds_each_row_to_its_precisions_limits():
    """The check verdict from planted outputs: equal to the reference passes, a map with its halves swapped fails
    the map Pearson limit, a NaN fails; a row of the reference precision gets none."""
    from clipad.benchmarks.bench_cli import _accuracy
    from clipad.runtime.manifest import Manifest
    from conftest import REPO

    manifest = Manifest.read(str(REPO / "tests" / "data" / "schema2-aaclip-tiny"))
    rng = np.random.default_rng(0)
    maps, scores = rng.normal(size=(4, 1, 8, 8)).astype(np.float32), rng.random((4, 1)).astype(np.float32)
    swapped = np.roll(maps, 4, axis=-1)
    broken = maps.copy()
    broken[1, 0, 0, 0] = np.nan
    table = [Row("onnxruntime", "fp32", 1, "ok", runs="fp32"), Row("openvino", "fp16", 1, "ok", runs="fp16"),
             Row("openvino", "bf16", 1, "ok", runs="bf16"), Row("onnxruntime", "int8", 1, "ok", runs="int8-cpu"),
             Row("tensorrt", "fp16", 1, "skipped", "no GPU")]
    outputs = [(maps, scores), (maps.copy(), scores.copy()), (swapped, scores), (broken, scores), None]
    _accuracy(table, outputs, manifest)
    assert [r.check for r in table] == [None, "passed", "failed", "failed", None]
    assert table[3].gate == "passed" and table[1].gate is None   # recorded for int8-cpu; no fp16 file there


def test_batch_outside_the_export_is_skipped(model, tmp_path):
    out = tmp_path / "b.json"
    assert edge_bench(["--model", str(model), "--backends", "onnxruntime", "--precisions", "fp32", "--batch", "4",
                       "--iters", "1", "--json", str(out), "-q"]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "skipped" and "--dynamic-batch 1:4" in row["reason"]


def test_openvino_cache_is_per_model_file_and_precision(model, tmp_path, monkeypatch):
    """A shared OpenVINO cache folder handed a BF16 compile another model's blob (NaN maps): one folder per file."""
    pytest.importorskip("openvino")
    from clipad.runtime.detector import Detector
    from clipad.runtime.manifest import Manifest

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    files = Manifest.read(str(model)).files
    for precision in ("fp32", "bf16"):
        with Detector.open(str(model), backend="openvino", precision=precision):
            pass
    assert sorted(p.name for p in (tmp_path / "clipad" / "openvino").iterdir()) == \
        sorted([f"{files['model.bf16.onnx'].sha256[:16]}-bf16", f"{files['model.onnx'].sha256[:16]}-fp32"])


def test_not_applicable_table():
    assert not_applicable("onnxruntime", "fp32") is None and not_applicable("openvino", "bf16") is None
    assert "no BF16 path" in not_applicable("onnxruntime", "bf16")
    assert not_applicable("tensorrt", "int8-cpu") and not_applicable("torch", "int8")
    assert not_applicable("torch", "bf16") is None                       # autocast(bfloat16)
    assert not_applicable("openvino", "int8-cpu") and not_applicable("tensorrt", "int8") is None


@pytest.mark.parametrize("args, needle", [
    (["--backends", "cuda"], "--backends 'cuda'"), (["--precisions", "fp8"], "--precisions 'fp8'"),
    (["--batch", "0"], "--batch '0'"), (["--iters", "0"], "--iters"),
    (["--threads", "100000"], "--threads 100000: must be between 1 and"),
])
def test_bad_arguments(model, capsys, args, needle):
    assert edge_bench(["--model", str(model), *args, "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_overlay_benchmark_runs():
    """The 1080p overlay is measured by a benchmark (python -m clipad.benchmarks.overlay_timing), not asserted here."""
    from clipad.benchmarks.overlay_timing import measure

    result = measure(640, 360, 56, repeat=3)
    assert set(result) == {"resize_map", "overlay"} and all(v["p50_ms"] > 0 for v in result.values())


def test_ort_profile_counts_only_the_profiled_runs(model, tmp_path):
    """The ONNX Runtime profile summary: MatMul FLOPs from the node shapes, the warm-up run left out, shares that add
    up; and the command on a real (tiny) export."""
    from clipad.benchmarks import ort_profile

    args = {"op_name": "MatMul", "input_type_shape": [{"float": [1, 197, 768]}],
            "output_type_shape": [{"float": [1, 197, 2304]}]}
    assert ort_profile.matmul_flops(args) == 2 * 768 * 197 * 2304

    def node(ts, dur, op):
        return {"cat": "Node", "name": f"n{ts}_kernel_time", "ts": ts, "dur": dur, "args": dict(args, op_name=op)}

    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 100_000}, node(10, 90_000, "Softmax"),  # warm-up
              {"cat": "Session", "name": "model_run", "ts": 200_000, "dur": 50_000}, node(210_000, 30_000, "MatMul"),
              node(245_000, 10_000, "Add")]
    summary = ort_profile.summarize(events, runs=1)
    assert summary["run_ms"] == 50.0 and [o["op"] for o in summary["ops"]] == ["MatMul", "Add"]
    assert summary["ops"][0]["share"] == 0.75 and summary["ops"][0]["gflop_per_s"] > 0
    assert ort_profile.main(["--model", str(model), "--threads", "-3", "-q"]) == 2   # bounded like every --threads
    assert ort_profile.main(["--model", str(model), "--runs", "1", "--json", str(tmp_path / "p.json"), "-q"]) == 0
    report = json.loads((tmp_path / "p.json").read_text())
    assert abs(sum(o["share"] for o in report["ops"]) - 1) < 0.01 and report["blas_gflop_per_s"] > 0
    assert any(o["op"] in ort_profile.MATMUL_OPS and o["gflops"] > 0 for o in report["ops"])


def test_reports_never_replace_the_model_or_the_inputs(model, tmp_path, capsys):
    """edge-bench, the ONNX Runtime profile, the soak and the Triton load script refuse a report path that is a file of the export they
    measure or one of their inputs, before measuring anything."""
    from PIL import Image

    from clipad.benchmarks import ort_profile, soak, triton_load
    from tiny_fixtures import images, write_video

    Image.fromarray(images(1, 40)[0]).save(tmp_path / "a.png")
    video = write_video(tmp_path / "v.avi", list(images(3, 40)))
    cases = [(edge_bench, ["--model", str(model), "--json", str(model / "model.onnx")], model / "model.onnx"),
             (edge_bench, ["--model", str(model), "--source", str(tmp_path), "--plot", str(tmp_path / "a.png")],
              tmp_path / "a.png"),
             (ort_profile.main, ["--model", str(model), "--json", str(model / "manifest.json")],
              model / "manifest.json"),
             (soak.main, ["--model", str(model), "--video", video, "--json", video], tmp_path / "v.avi"),
             (triton_load.main, ["--model", str(model), "--url", "127.0.0.1:9", "--triton-model", "m_pipeline",
                                 "--source", str(tmp_path), "--markdown", str(model / "model.onnx")],
              model / "model.onnx")]
    for command, args, target in cases:
        before = target.read_bytes()
        assert command(args + ["-q"]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "would overwrite the input" in err[0], err
        assert target.read_bytes() == before


def test_save_choice_then_backend_best(model, tmp_path, capsys, caplog):
    """--save-choice keeps the fastest edge row whose export gate passed (the kept-but-failed int8-cpu row never
    qualifies, whatever its speed); edge-detect --backend best runs it and says so; stale or foreign choices are one
    line each."""
    import shutil

    from PIL import Image

    from clipad.runtime import best_choice
    from clipad.runtime.detect.cli import main as edge_detect

    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    out = tmp_path / "b.json"
    assert edge_detect(["--model", str(folder), "--source", str(tmp_path / "none"), "--backend", "best", "-q"]) == 2
    assert "no bench-choices.json" in capsys.readouterr().err
    assert edge_bench(["--model", str(folder), "--backends", "onnxruntime,openvino", "--precisions", "fp32,bf16,int8",
                       "--iters", "2", "--json", str(out), "--save-choice", "-q"]) == 0
    data = json.loads(out.read_text())
    eligible = [r for r in data["rows"] if r["status"] == "ok" and (r["gate"] == "passed" or r["precision"] == "fp32")]
    fastest = min(eligible, key=lambda r: r["p50_ms"])
    assert rows(data, "onnxruntime", "int8")["gate"] == "accepted" and "int8" not in {r["precision"] for r in eligible}
    assert data["choice"]["backend"] == fastest["backend"] and data["choice"]["precision"] == fastest["precision"]
    choices = json.loads((folder / best_choice.CHOICES_FILE).read_text())["choices"]
    (key, entry), = choices.items()
    assert entry["machine"]["cpu_flags"] == sorted(data["env"]["cpu_flags"]) and key.startswith(data["env"]["cpu"])
    assert "run edge-detect --backend best" in capsys.readouterr().out

    image = tmp_path / "part.png"
    Image.fromarray(np.full((60, 60, 3), 90, np.uint8)).save(image)
    jsonl = tmp_path / "r.jsonl"
    assert edge_detect(["--model", str(folder), "--source", str(image), "--backend", "best",
                        "--jsonl", str(jsonl)]) == 0
    capsys.readouterr()
    assert f"--backend best: {fastest['backend']} {fastest['precision']}, the fastest row" in caplog.text
    assert len(jsonl.read_text().splitlines()) == 1
    other = "int8" if fastest["precision"] != "int8" else "fp32"
    assert edge_detect(["--model", str(folder), "--source", str(image), "--backend", "best", "--precision", other,
                        "-q"]) == 2
    assert "drop --precision" in capsys.readouterr().err

    choices = {"another CPU [avx2] x64; gpu none": entry}
    (folder / best_choice.CHOICES_FILE).write_text(json.dumps({"version": 1, "choices": choices}))
    assert edge_detect(["--model", str(folder), "--source", str(image), "--backend", "best", "-q"]) == 2
    assert "no choice measured on this machine" in capsys.readouterr().err
    choices = {key: {**entry, "sha256": "0" * 64}}
    (folder / best_choice.CHOICES_FILE).write_text(json.dumps({"version": 1, "choices": choices}))
    assert edge_detect(["--model", str(folder), "--source", str(image), "--backend", "best", "-q"]) == 2
    assert "re-exported since?" in capsys.readouterr().err
    choices = {key: {**entry, "backend": "nosuch"}}
    (folder / best_choice.CHOICES_FILE).write_text(json.dumps({"version": 1, "choices": choices}))
    assert edge_detect(["--model", str(folder), "--source", str(image), "--backend", "best", "-q"]) == 2
    assert "does not run at the edge" in capsys.readouterr().err
    (folder / best_choice.CHOICES_FILE).write_text("{not json")
    assert edge_detect(["--model", str(folder), "--source", str(image), "--backend", "best", "-q"]) == 2
    assert "unreadable" in capsys.readouterr().err


def test_chip_columns(report):
    """The model's matrix-product work, this machine's ceiling per library and data type, each row's share of it."""
    data, out = report
    chip = data["chip"]
    assert chip["model_gflop"] > 0
    assert {"numpy fp32", "torch bf16", "onnxruntime fp32", "openvino fp32"} <= set(chip["ceilings_gflops"])
    autocast = rows(data, "torch", "bf16")
    assert autocast["of_ceiling"] == pytest.approx(autocast["gflops"] / chip["ceilings_gflops"]["torch bf16"], abs=1e-3)
    assert all(v > 0 for v in chip["ceilings_gflops"].values())
    row = rows(data, "onnxruntime", "fp32")
    assert row["gflops"] == round(chip["model_gflop"] / (row["stages_ms"]["infer"] / 1e3), 1)   # as annotate rounds
    assert row["of_ceiling"] == pytest.approx(row["gflops"] / chip["ceilings_gflops"]["onnxruntime fp32"], abs=1e-3)
    assert rows(data, "onnxruntime", "bf16")["gflops"] is None            # skipped rows have none
    from clipad.benchmarks.chip import ceiling_key    # the Q/DQ file's rows (this export has none) and their ceiling

    assert {ceiling_key(b, "int8") for b in ("openvino", "onnxruntime")} <= set(chip["ceilings_gflops"])
    assert "chip: " in (out / "b.md").read_text() and "| GFLOP/s | of ceiling |" in (out / "b.md").read_text()


def test_qdq_ceiling_probe_is_the_int8_product_and_openvino_runs_it_in_int8(tmp_path):
    """The Q/DQ ceiling measures a real INT8 product: its result is the FP32 product within INT8 rounding, and
    OpenVINO's compiled model runs the matrix product on INT8 operands (not a float fallback)."""
    import onnxruntime as ort
    import openvino as ov

    from clipad.benchmarks.chip import SHAPE, _qdq_matmul_onnx

    m, k, n = SHAPE
    rng = np.random.default_rng(3)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = (rng.standard_normal((k, n), dtype=np.float32) / 32).astype(np.float32)
    path = str(tmp_path / "qdq.onnx")
    _qdq_matmul_onnx(path, w, float(np.abs(x).max()))
    exact = x @ w
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    error = np.abs(got - exact).max() / np.abs(exact).max()
    assert 1e-4 < error < 0.03, error          # INT8 rounding: not exact, not garbage
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    products = [op for op in compiled.get_runtime_model().get_ordered_ops()
                if op.get_rt_info()["layerType"].astype(str) in ("FullyConnected", "MatMul")]
    assert products and all(op.get_rt_info()["runtimePrecision"].astype(str) in ("i8", "u8") for op in products), \
        [(op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
         for op in products]


def test_model_gflop_counts_matmul_gemm_and_conv(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from clipad.benchmarks.chip import model_gflop

    w = numpy_helper.from_array(np.ones((12, 16), np.float32), "w")
    k = numpy_helper.from_array(np.ones((4, 3, 2, 2), np.float32), "k")
    nodes = [helper.make_node("Conv", ["img", "k"], ["c"], strides=[2, 2]),         # out [B, 4, 5, 5]
             helper.make_node("Reshape", ["c", "shape"], ["flat"]),                 # data movement: no work
             helper.make_node("MatMul", ["x", "w"], ["y"])]                         # [B, 7, 12] @ [12, 16]
    shape = numpy_helper.from_array(np.array([-1, 25, 4], np.int64), "shape")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["b", 3, 10, 10]),
                                           helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 7, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("flat", TensorProto.FLOAT, None)], [w, k, shape])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    conv = 2 * (4 * 5 * 5) * (3 * 2 * 2)
    matmul = 2 * (7 * 16) * 12
    assert model_gflop(str(path)) == pytest.approx((conv + matmul) / 1e9)
