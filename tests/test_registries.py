"""The vocabularies live once: every precision's name is spelled in at most two source files (bf16: three), the
command lines offer exactly the registries' entries, a backend refuses options it does not take, and the auto policy
warns about the options of the backend that did not win."""
from __future__ import annotations

import ast
import collections

import pytest

from clipad.runtime import precisions
from clipad.runtime.backends import registry
from clipad.runtime.errors import ClipadError
from clipad.runtime.manifest import Manifest
from conftest import REPO

SOURCE_FOLDERS = ("clipad", "runtime", "export", "calibration", "benchmarks", "scripts")


def literal_files() -> dict[str, set[str]]:
    """For each precision name, the non-test source files that spell it as a string literal."""
    found = collections.defaultdict(set)
    for folder in SOURCE_FOLDERS:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Constant) and node.value in precisions.PRECISIONS:
                    found[node.value].add(str(path.relative_to(REPO)))
    return found


def test_each_precision_is_spelled_in_at_most_two_files():
    found = literal_files()
    assert set(found) == set(precisions.NAMES)      # the walk sees the registry itself
    for name, files in found.items():
        limit = 3 if name == "bf16" else 2          # bf16 is also OpenVINO's hint value
        assert len(files) <= limit, (name, sorted(files))
        assert "runtime/precisions.py" in files


def test_the_counter_counts():
    """The AST walk finds a planted literal (so the test above can fail)."""
    tree = ast.parse("x = 'fp16'\ny = f'{z} fp16'\n")
    assert sum(isinstance(n, ast.Constant) and n.value == "fp16" for n in ast.walk(tree)) == 1


def test_command_lines_offer_the_registries():
    from clipad.benchmarks import bench_cli
    from clipad.export import cli as export_cli
    from clipad.runtime.detect import cli as detect_cli

    assert detect_cli.parse_args(["--model", "m", "--source", "x"]).backend == registry.AUTO
    for precision in precisions.NAMES:
        assert detect_cli.parse_args(["--model", "m", "--source", "x", "--precision", precision]).precision == precision
    for backend in registry.EDGE_CHOICES:
        assert detect_cli.parse_args(["--model", "m", "--source", "x", "--backend", backend]).backend == backend
    with pytest.raises(SystemExit):
        detect_cli.parse_args(["--model", "m", "--source", "x", "--backend", "torch"])   # not an edge backend
    exportable = [p.name for p in precisions.PRECISIONS.values() if p.reference or p.conversion]
    assert exportable == list(precisions.EXPORTABLE) == list(precisions.NAMES)   # each precision has its file
    for precision in exportable:
        assert export_cli.parse_args(["--from-onnx", "d", "--precision", precision]).precision == precision
    with pytest.raises(SystemExit):
        export_cli.parse_args(["--from-onnx", "d", "--precision", "bf32"])
    assert set(bench_cli.PRECISIONS) == set(precisions.NAMES)
    assert set(bench_cli.BACKENDS) == {b.name for b in registry.BACKENDS.values() if not b.remote}


def test_every_backend_record_loads_and_takes_its_options():
    import inspect

    for spec in registry.BACKENDS.values():
        cls = spec.load()
        assert cls.name == spec.name
        entry = cls.open if "open" in vars(cls) else cls.__init__   # the base open hands options to __init__
        taken = set(inspect.signature(entry).parameters) - {"self", "cls", "model_dir", "manifest"}
        if spec.name == "openvino":
            taken -= {"ov_device"}        # OpenVINO's device string is internal (CPU), not the GPU index option
        assert set(spec.options) == taken, spec.name


def test_a_named_backend_refuses_options_it_does_not_take():
    manifest = Manifest.read(str(REPO / "tests" / "data" / "schema2-aaclip-tiny"))
    with pytest.raises(ClipadError, match="--cuda-graph: not an option of the onnxruntime backend"):
        registry.open_backend("onnxruntime", "x", manifest, cuda_graph=True)
    with pytest.raises(ClipadError, match="--threads: not an option of the tensorrt backend"):
        registry.open_backend("tensorrt", "x", manifest, threads=2)
    with pytest.raises(ClipadError, match="unknown backend 'cuda'"):
        registry.open_backend("cuda", "x", manifest)


def test_auto_warns_about_options_only_tensorrt_takes(caplog):
    folder = str(REPO / "tests" / "data" / "schema2-aaclip-tiny")
    backend = registry.open_backend("auto", folder, Manifest.read(folder), cuda_graph=True, engine="x.engine")
    try:
        assert backend.name == "onnxruntime"            # no GPU here
        assert "--cuda-graph, --engine only apply to TensorRT" in caplog.text
    finally:
        backend.close()


def test_int8_on_a_cpu_runs_the_cpu_file_and_bf16_is_refused_by_onnxruntime():
    folder = str(REPO / "tests" / "data" / "schema2-aaclip-tiny")
    manifest = Manifest.read(folder)
    backend = registry.open_backend("onnxruntime", folder, manifest, precision="int8")
    try:
        assert backend.precision == "int8-cpu" and backend.path.endswith("model.int8-cpu.onnx")
    finally:
        backend.close()
    with pytest.raises(ClipadError, match="no BF16 path"):
        registry.open_backend("onnxruntime", folder, manifest, precision="bf16")
    with pytest.raises(ClipadError, match="unknown precision 'fp8'"):
        registry.open_backend("onnxruntime", folder, manifest, precision="fp8")
