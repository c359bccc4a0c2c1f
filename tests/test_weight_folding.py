"""Weights the exporter leaves behind a Transpose or a Gather (above its folding size limit: Crane's transposed
out-projections, AA-CLIP's stacked adapters) are folded into constants, so every precision counts and converts those
linear layers; an export made before the fold gets a folded working copy."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from tiny_fixtures import export_tiny, manifest_json


def _unfolded_graph():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 8)).astype(np.float32)
    stacked = rng.normal(size=(3, 8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["w_t"], ["w"], perm=[1, 0], name="read_w"),
        helper.make_node("MatMul", ["x", "w"], ["y1"], name="linear_transposed"),
        helper.make_node("Constant", [], ["index"], value=numpy_helper.from_array(np.array(1, np.int64)),
                         name="index"),
        helper.make_node("Gather", ["stacked", "index"], ["picked"], axis=0, name="select"),
        helper.make_node("Transpose", ["picked"], ["picked_t"], perm=[1, 0], name="read_picked"),
        helper.make_node("MatMul", ["y1", "picked_t"], ["y2"], name="linear_gathered"),
        helper.make_node("Transpose", ["y2"], ["z"], perm=[1, 0], name="activation_transpose"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [8, 2])],
                              [numpy_helper.from_array(w.T.copy(), "w_t"), numpy_helper.from_array(stacked, "stacked")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model, x):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_transposed_and_gathered_weights_become_constants_with_the_same_numbers():
    import onnx

    from clipad.export.convert import linear_nodes
    from clipad.export.onnx_graph import fold_constant_weight_reads

    model = _unfolded_graph()
    x = np.random.default_rng(1).normal(size=(2, 8)).astype(np.float32)
    before = _run(model, x)
    assert linear_nodes(model) == []
    assert fold_constant_weight_reads(model) == 3
    onnx.checker.check_model(model)
    assert [n.name for n in model.graph.node] == ["linear_transposed", "linear_gathered", "activation_transpose"]
    assert {t.name for t in model.graph.initializer} == {"w", "picked_t"}   # the stacked buffer went with its Gather
    assert linear_nodes(model) == ["linear_transposed", "linear_gathered"]
    assert np.array_equal(_run(model, x), before)
    assert fold_constant_weight_reads(model) == 0


def _unfold(model_file):
    """Put a Transpose in front of every linear layer's weight, as the exporter leaves large weights."""
    import onnx
    from onnx import helper, numpy_helper

    from clipad.export.convert import linear_nodes

    model = onnx.load(str(model_file))
    linear = set(linear_nodes(model))
    inits = {t.name: t for t in model.graph.initializer}
    reads = []
    for node in model.graph.node:
        if node.name in linear and node.op_type == "MatMul" and node.input[1] in inits \
                and not any(r.output[0] == node.input[1] for r in reads):
            tensor = inits[node.input[1]]
            value = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(value.T.copy(), tensor.name + "_t"))
            reads.append(helper.make_node("Transpose", [tensor.name], [node.input[1]], perm=[1, 0],
                                          name=f"read_{node.name}"))
    nodes = reads + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(model_file))
    return len(reads)


def _old_export(tiny_files, old):
    """A tiny Crane export whose model.onnx reads every linear weight through a Transpose (manifest kept valid)."""
    assert export_tiny(tiny_files, old, "crane") == 0
    reads = _unfold(old / "model.onnx")
    manifest = json.loads((old / "manifest.json").read_text())
    data = (old / "model.onnx").read_bytes()
    manifest["files"]["model.onnx"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (old / "manifest.json").write_text(json.dumps(manifest))
    return reads, manifest


def test_an_export_made_before_the_fold_quantizes_the_same_layers(tiny_files, tmp_path):
    from clipad.export import cli as export_cli

    fresh, old = tmp_path / "fresh", tmp_path / "old"
    assert export_tiny(tiny_files, fresh, "crane") == 0
    reads, manifest = _old_export(tiny_files, old)
    assert reads > 4
    for out in (fresh, old):
        assert export_cli.main(["--from-onnx", str(out), "--precision", "int8-cpu", "--accept-accuracy-loss",
                                "-q"]) == 0
    made = [manifest_json(out)["precisions"]["int8-cpu"]["conversion"] for out in (fresh, old)]
    assert made[0]["quantized_nodes"] > reads // 2   # without the fold the old export would quantize none
    assert made[1]["quantized_nodes"] == made[0]["quantized_nodes"]
    assert made[1]["kept_float_nodes"] == made[0]["kept_float_nodes"]
    assert not [p.name for p in old.iterdir() if p.name.startswith(".folded-")]
    assert manifest_json(old)["files"]["model.onnx"]["sha256"] == manifest["files"]["model.onnx"]["sha256"]


def _no_space(save, model, path, *args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def _ctrl_c_after(save, model, path, *args, **kwargs):
    save(model, path, *args, **kwargs)     # the copy is on disk when the user presses Ctrl-C
    raise KeyboardInterrupt


@pytest.mark.parametrize("fault, code, message", [
    (_no_space, 2, "cannot write the folded working copy of model.onnx (No space left on device)"),
    (_ctrl_c_after, 130, "interrupted; nothing written")], ids=["full-disk", "ctrl-c"])
def test_a_fault_while_writing_the_working_copy_is_one_line_and_leaves_the_export_as_it_was(
        tiny_files, tmp_path, monkeypatch, capsys, fault, code, message):
    import onnx

    from clipad.export import cli as export_cli

    old = tmp_path / "old"
    _old_export(tiny_files, old)
    before = {p.name: p.stat().st_mtime_ns for p in old.iterdir()}
    real_save = onnx.save

    def save(model, path, *args, **kwargs):
        if ".folded-" in str(path):
            return fault(real_save, model, path, *args, **kwargs)
        return real_save(model, path, *args, **kwargs)

    monkeypatch.setattr(onnx, "save", save)
    assert export_cli.main(["--from-onnx", str(old), "--precision", "int8-cpu", "-q"]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert {p.name: p.stat().st_mtime_ns for p in old.iterdir()} == before   # no .folded-* left, nothing rewritten


@pytest.mark.parametrize("kind", ["aaclip", "crane"])
def test_a_fresh_export_has_no_weight_behind_a_layout_op(tiny_files, tmp_path, kind):
    import onnx

    from clipad.export.onnx_graph import fold_constant_weight_reads

    assert export_tiny(tiny_files, tmp_path / kind, kind) == 0
    assert fold_constant_weight_reads(onnx.load(str(tmp_path / kind / "model.onnx"))) == 0
