"""Serving on Triton: the repository export-engine --triton-repo writes (configs parsed with Triton's own
model-config protobuf), and a real tritonserver (nvidia-pytriton's, started by edge-serve from ./.venv-serve)
answering over HTTP and gRPC exactly as edge-detect does locally, batching concurrent clients, surviving a corrupt
image and stopping cleanly."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clipad.export import cli as export_cli
from clipad.export.options import TritonOptions
from clipad.export.triton_repo import write_triton_repository as write_repository
from clipad.runtime.detect.cli import main as edge_detect
from clipad.runtime.detector import Detector
from clipad.runtime.errors import ClipadError
from clipad.runtime.preprocess import prepare
from tiny_fixtures import export_tiny

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVE_ENV = Path(os.environ.get("CLIPAD_SERVE_ENV", REPO_ROOT / ".venv-serve"))
SERVER_PLATFORM = sys.platform.startswith("linux") and os.uname().machine == "x86_64"   # nvidia-pytriton's wheels


def write_triton_repository(export, repo, name, flavor, precision="fp32", **options):
    return write_repository(str(export), TritonOptions(repo=str(repo), name=name, flavor=flavor, **options),
                            precision)


def model_config_pb2():
    """Triton's model-config protobuf (tritonclient, in the dev extra): only the tests that parse configs need it."""
    return pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient is not installed")


@pytest.fixture(scope="module")
def export(tiny_files, tmp_path_factory, calib_dir):
    """A tiny AA-CLIP export (two classes, batch 1…4), calibrated on generated normal images."""
    from clipad.calibration.cli import main as edge_calibrate
    from clipad.calibration.samples import write_samples

    root = tmp_path_factory.mktemp("served")
    out = root / "aa"
    assert export_tiny(tiny_files, out, "aaclip", ["--dynamic-batch", "1:4", "--no-engine"]) == 0
    write_samples(str(root / "samples"), count=24, seed=3)
    assert edge_calibrate(["--model", str(out), "--normal", str(root / "samples" / "*_good.png"), "--target-fpr",
                           "0.2", "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def images(export):
    return sorted((export.parent / "samples").glob("*.png"))[:6]


def parse_config(folder: Path):
    from google.protobuf import text_format

    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2().ModelConfig())


@pytest.mark.parametrize("flavor", ["python", "onnxruntime"])
def test_configs_parse_with_tritons_protobuf(export, tmp_path, flavor):
    repo = tmp_path / "repo"
    written = write_triton_repository(export, repo, "aa", flavor, max_queue_delay_us=500)
    assert sorted(written) == ["aa", "aa_pipeline", "aa_post", "aa_pre"]
    model = parse_config(repo / "aa")
    assert (model.backend, model.platform) == (("python", "") if flavor == "python" else ("", "onnxruntime_onnx"))
    assert model.max_batch_size == (8 if flavor == "python" else 4)
    assert [(i.name, list(i.dims)) for i in model.input] == [("images", [56, 56, 3])]
    assert [(o.name, list(o.dims)) for o in model.output] == [("anomaly_map", [2, 56, 56]), ("image_score", [2])]
    assert model.dynamic_batching.max_queue_delay_microseconds == 500
    served = json.loads(model.parameters["clipad_manifest"].string_value)
    assert served["model"]["class_names"] == ["bottle", "screw"] and served["calibrations"]
    pipeline = parse_config(repo / "aa_pipeline")
    assert [s.model_name for s in pipeline.ensemble_scheduling.step] == ["aa_pre", "aa", "aa_post"]
    assert {o.name for o in pipeline.output} >= {"anomaly_map", "image_score", "label", "p_value"}
    for role in ("pre", "post"):
        config = parse_config(repo / f"aa_{role}")
        assert config.backend == "python" and (repo / f"aa_{role}" / "1" / "model.py").is_file()
    assert (repo / "aa" / "1" / "model.onnx").is_file() and (repo / "aa" / "manifest.json").is_file()


def test_execution_accelerators_parse(export, tmp_path):
    write_triton_repository(export, tmp_path / "r", "aa", "onnxruntime", accelerator="tensorrt")
    config = parse_config(tmp_path / "r" / "aa")
    (trt,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP32"
    write_triton_repository(export, tmp_path / "r", "aa", "onnxruntime", accelerator="openvino")
    config = parse_config(tmp_path / "r" / "aa")
    assert [a.name for a in config.optimization.execution_accelerators.cpu_execution_accelerator] == ["openvino"]
    served = json.loads(config.parameters["clipad_manifest"].string_value)
    assert served["triton"] == {"flavor": "onnxruntime", "precision": "fp32", "accelerator": "openvino"}
    with pytest.raises(ClipadError, match="is for --triton-backend onnxruntime"):
        write_triton_repository(export, tmp_path / "r", "aa", "python", accelerator="tensorrt")


def test_repository_refusals(export, tmp_path, tiny_files):
    with pytest.raises(ClipadError, match="lists no fp16 engine"):
        write_triton_repository(export, tmp_path / "r", "aa", "tensorrt", precision="fp16")
    with pytest.raises(ClipadError, match="must not be the export folder"):
        write_triton_repository(export, export / "repo", "aa", "python")
    foreign = tmp_path / "r2" / "aa_post"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ClipadError, match="not written by export-engine"):
        write_triton_repository(export, tmp_path / "r2", "aa", "python")
    assert (foreign / "notes.txt").read_text() == "mine" and not (tmp_path / "r2" / "aa").exists()
    with pytest.raises(ClipadError, match="Triton model name"):
        write_triton_repository(export, tmp_path / "r3", "a b", "python")
    fixed = tmp_path / "fixed"
    assert export_tiny(tiny_files, fixed, "aaclip", ["--batch", "2", "--no-engine"]) == 0
    with pytest.raises(ClipadError, match="re-export with --dynamic-batch 1:N"):
        write_triton_repository(fixed, tmp_path / "r4", "f", "onnxruntime")
    write_triton_repository(fixed, tmp_path / "r4", "f", "python")   # the runtime pads to batch 2


def test_rewriting_replaces_only_its_own_models(export, tmp_path):
    repo = tmp_path / "repo"
    other = repo / "someone_else" / "1"
    other.mkdir(parents=True)
    write_triton_repository(export, repo, "aa", "python", instances=1)
    assert export_cli.main(["--from-onnx", str(export), "--triton-repo", str(repo), "--triton-name", "aa",
                            "--triton-backend", "python", "--instances", "3", "-q"]) == 0
    assert parse_config(repo / "aa").instance_group[0].count == 3
    assert other.is_dir() and not [p for p in os.listdir(repo) if p.startswith(".")]


def test_edge_detect_needs_a_model_or_a_server(export, images, capsys):
    assert edge_detect(["--source", str(images[0]), "-q"]) == 2
    assert edge_detect(["--triton-model", "aa", "--source", str(images[0]), "-q"]) == 2
    assert edge_detect(["--triton", "localhost:1", "--triton-model", "aa", "--precision", "int8", "--source",
                        str(images[0]), "-q"]) == 2
    assert edge_detect(["--triton", "localhost:1", "--triton-model", "aa", "--model", str(export), "--source",
                        str(images[0]), "-q"]) == 2    # --model would be ignored while the header named it
    err = capsys.readouterr().err.splitlines()
    assert "--model DIR is required" in err[0] and "go together" in err[1] and "drop --precision" in err[2]
    assert "drop --model" in err[3] and len(err) == 4


def test_python_flavor_serves_the_cpu_int8_file(export, tmp_path, calib_dir):
    """--triton-backend python --precision int8 on an export with model.int8-cpu.onnx: the repository carries the CPU
    file and the served model (Triton's Python backend runs ONNX Runtime on the CPU) runs it, not the Q/DQ file that
    is 2.3x slower than FP32 on a CPU."""
    from clipad.runtime.serving.triton_models import OnnxModel

    both = tmp_path / "both"
    shutil.copytree(export, both)
    assert export_cli.main(["--from-onnx", str(both), "--precision", "int8-cpu", "--accept-accuracy-loss", "-q"]) == 0
    assert export_cli.main(["--from-onnx", str(both), "--precision", "int8", "--calib-data", str(calib_dir),
                            "--accept-accuracy-loss", "--no-engine", "-q"]) == 0
    repo = tmp_path / "repo"
    assert export_cli.main(["--from-onnx", str(both), "--triton-repo", str(repo), "--triton-name", "aa",
                            "--triton-backend", "python", "--precision", "int8", "-q"]) == 0
    version = repo / "aa" / "1"
    assert {"model.onnx", "model.int8.onnx", "model.int8-cpu.onnx"} <= set(os.listdir(version))
    config = (repo / "aa" / "config.pbtxt").read_text()
    assert 'key: "clipad_precision" value { string_value: "int8" }' in config
    served = OnnxModel()   # what Triton's Python backend runs, given the config's parameters as JSON
    served.initialize({"model_repository": str(repo / "aa"), "model_version": "1",
                       "model_config": json.dumps({"parameters": {"clipad_precision": {"string_value": "int8"}}})})
    try:
        assert served.detector.backend.precision == "int8-cpu"
        assert os.path.basename(served.detector.backend.path) == "model.int8-cpu.onnx"
    finally:
        served.finalize()


def test_bytes_preprocessing_is_the_files(images):
    for path in images[:3]:
        assert np.array_equal(prepare(path.read_bytes(), 56), prepare(str(path), 56))
    with pytest.raises(ClipadError, match="not an image"):
        prepare(b"\xff\xd8 not a jpeg", 56)


def test_served_decisions_are_edge_detects(export, images):
    from clipad.runtime.serving.triton_models import ServedDecisions

    with Detector.open(str(export), backend="onnxruntime") as det:
        batch = np.stack([prepare(str(p), 56) for p in images])
        maps, scores = det.run(batch)
        served = ServedDecisions(det.manifest, "fp32", "onnxruntime").decide(maps, scores)
        for i in range(len(images)):
            for k, name in enumerate(det.class_names):
                pred = det.decide(name, maps[i, k], float(scores[i, k]))
                assert served["label"][i, k] == pred.label.encode()
                assert served["p_value"][i, k] == np.float32(pred.p_value)
                assert served["decision_score"][i, k] == np.float32(pred.decision_score)


# ---- a real server ---------------------------------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_server(export, folder: Path) -> dict:
    """edge-serve from ./.venv-serve on a python-flavor repository of ``export``. Where nvidia-pytriton installs
    (Linux x86-64) a missing serve environment fails the test (scripts/setup_env.sh must make it); elsewhere skips."""
    edge_serve = SERVE_ENV / "bin" / "edge-serve"
    if not edge_serve.exists():
        message = (f"{edge_serve} missing: clipad-edge[serve] (nvidia-pytriton) did not install "
                   f"(scripts/setup_env.sh makes it on Linux x86-64)")
        pytest.fail(message) if SERVER_PLATFORM else pytest.skip(message)
    repo = folder / "repo"
    assert export_cli.main(["--from-onnx", str(export), "--triton-repo", str(repo), "--triton-name", "aa",
                            "--triton-backend", "python", "--max-queue-delay-us", "100000", "-q"]) == 0
    http, grpc, metrics = free_ports(3)
    log = open(folder / "serve.log", "w+")
    proc = subprocess.Popen([str(edge_serve), str(repo), "--http-port", str(http), "--grpc-port", str(grpc),
                             "--metrics-port", str(metrics)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while "Triton ready" not in Path(log.name).read_text():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"edge-serve did not start: {Path(log.name).read_text()[-2000:]}")
        time.sleep(0.5)
    return {"proc": proc, "http": f"localhost:{http}", "grpc": f"localhost:{grpc}", "metrics": metrics,
            "ports": (http, grpc, metrics), "log": log, "repo": repo}


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    started = start_server(export, tmp_path_factory.mktemp("triton"))
    yield started
    if started["proc"].poll() is None:
        started["proc"].kill()
        started["proc"].wait()


def pipeline_request(module, url, data: bytes):
    client = module.InferenceServerClient(url)
    tensor = module.InferInput("IMAGE", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[data]], dtype=object))
    return client.infer("aa_pipeline", [tensor])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_pipeline_answers_as_edge_detect(server, export, images, protocol):
    import tritonclient.grpc
    import tritonclient.http

    module = tritonclient.http if protocol == "http" else tritonclient.grpc
    with Detector.open(str(export), backend="onnxruntime") as det:
        for path in images:
            result = pipeline_request(module, server[protocol], path.read_bytes())
            maps, scores = det.run(prepare(str(path), 56)[None])
            assert np.abs(result.as_numpy("anomaly_map")[0] - maps[0]).max() <= 1e-6
            assert np.abs(result.as_numpy("image_score")[0] - scores[0]).max() <= 1e-6
            for k, name in enumerate(det.class_names):
                pred = det.decide(name, maps[0, k], float(scores[0, k]))
                assert result.as_numpy("label")[0, k].decode() == pred.label
                assert abs(result.as_numpy("p_value")[0, k] - pred.p_value) <= 1e-6


def test_edge_detect_on_triton_writes_the_local_records(server, export, images, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for p in images:
        (folder / p.name).write_bytes(p.read_bytes())
    local, remote, remote_grpc = tmp_path / "l.jsonl", tmp_path / "r.jsonl", tmp_path / "g.jsonl"
    assert edge_detect(["--model", str(export), "--source", str(folder), "--jsonl", str(local), "-q"]) == 0
    assert edge_detect(["--triton", server["http"], "--triton-model", "aa", "--source", str(folder), "--jsonl",
                        str(remote), "--batch", "3", "-q"]) == 0
    assert edge_detect(["--triton", server["grpc"], "--grpc", "--triton-model", "aa", "--source", str(folder),
                        "--jsonl", str(remote_grpc), "-q"]) == 0
    strip = ("time", "latency_ms")
    rows = [[{k: v for k, v in json.loads(line).items() if k not in strip} for line in f.read_text().splitlines()]
            for f in (local, remote, remote_grpc)]
    assert len(rows[0]) == len(images)
    for a, b, c in zip(*rows):
        for key in ("score", "decision_score", "p_value", "map_max"):
            assert abs(a[key] - b[key]) <= 1e-6 and abs(a[key] - c[key]) <= 1e-6
        assert a["label"] == b["label"] == c["label"] and a["source"] == b["source"]


def test_edge_detect_triton_errors_are_one_line(server, images, capsys):
    args = ["--source", str(images[0]), "-q"]
    assert edge_detect(["--triton", "localhost:1", "--triton-model", "aa"] + args) == 2
    assert edge_detect(["--triton", server["http"], "--triton-model", "missing"] + args) == 2
    assert edge_detect(["--triton", server["http"], "--triton-model", "aa_pre"] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "unreachable" in err[0] and "not ready" in err[1] and "_pre" in err[2]


def test_concurrent_clients_are_batched(server, export, images):
    import tritonclient.http

    batch = np.stack([prepare(str(p), 56) for p in images])
    client = tritonclient.http.InferenceServerClient(server["http"], concurrency=16)
    before = client.get_inference_statistics("aa")["model_stats"][0]
    requests = []
    for i in range(16):
        tensor = tritonclient.http.InferInput("images", [1, 56, 56, 3], "UINT8")
        tensor.set_data_from_numpy(batch[i % len(batch)][None])
        requests.append(client.async_infer("aa", [tensor]))
    results = [r.get_result() for r in requests]
    with Detector.open(str(export), backend="onnxruntime") as det:
        maps, _ = det.run(batch)
    for i, result in enumerate(results):
        assert np.abs(result.as_numpy("anomaly_map")[0] - maps[i % len(batch)]).max() <= 1e-6
    after = client.get_inference_statistics("aa")["model_stats"][0]
    inferences = after["inference_count"] - before.get("inference_count", 0)
    executions = after["execution_count"] - before.get("execution_count", 0)
    assert inferences == 16 and executions < inferences, (inferences, executions)


def test_corrupt_image_is_an_error_response_and_the_server_stays_up(server, images):
    import tritonclient.http
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="not an image"):
        pipeline_request(tritonclient.http, server["http"], b"\x89PNG\r\n\x1a\n broken")
    client = tritonclient.http.InferenceServerClient(server["http"])
    assert client.is_server_ready() and client.is_model_ready("aa_pipeline")
    assert pipeline_request(tritonclient.http, server["http"], images[0].read_bytes()).as_numpy("label") is not None


def test_edge_serve_refuses_cleanly(export, server, tmp_path):
    edge_serve = str(SERVE_ENV / "bin" / "edge-serve")
    missing = subprocess.run([edge_serve, str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no such model repository" in missing.stderr
    busy = subprocess.run([edge_serve, str(server["repo"]), "--http-port", str(server["ports"][0])],
                          capture_output=True, text=True, timeout=60)
    assert busy.returncode == 2 and "already in use" in busy.stderr and len(busy.stderr.strip().splitlines()) == 1
    here = subprocess.run([sys.executable, "-m", "clipad.runtime.serving.edge_serve", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert here.returncode == 2 and "Traceback" not in here.stderr


def test_zz_sigterm_stops_the_server_cleanly(server, images):
    """Last (module order): SIGTERM to edge-serve stops Triton and exits 143 (every command's SIGTERM status); its
    ports are free again; a client that was connected gets one-line errors after bounded retries (edge-detect turns
    them into error records)."""
    proc = server["proc"]
    client = Detector.open(None, backend="triton", triton_url=server["http"], triton_model="aa")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    with pytest.raises(ClipadError, match="request failed after 4 tries"):
        client.run(prepare(str(images[0]), 56)[None])
    client.close()
    assert "Triton stopped" in Path(server["log"].name).read_text()
    for port in server["ports"]:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
    leftovers = subprocess.run(["pgrep", "-f", f"http-port={server['ports'][0]}"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""


def test_zz_a_killed_tritonserver_is_named_as_killed(export, tmp_path):
    """When tritonserver dies from a signal, edge-serve says so (it blamed a harmless start-up line, "CUDA driver
    version is insufficient", before)."""
    started = start_server(export, tmp_path)
    found = subprocess.run(["pgrep", "-f", f"http-port={started['ports'][0]}"], capture_output=True, text=True)
    pids = [int(p) for p in found.stdout.split()]
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert started["proc"].wait(timeout=60) == 2
    text = Path(started["log"].name).read_text()
    last = text.strip().splitlines()[-1]
    assert "tritonserver was killed by SIGKILL" in last and "CUDA driver" not in last
