"""export-engine on tiny configurations: files, manifest, graph rules, atomic failure."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

from clipad.export import cli as export_cli
from clipad.export import onnx_export
from clipad.runtime.compare import GateLimits
from clipad.runtime.manifest import SCHEMA_VERSION, Manifest, sha256_file
from tiny_fixtures import TINY
from tiny_fixtures import export_tiny as export


@pytest.mark.parametrize("kind", ["aaclip", "crane", "clip"])
def test_export_writes_onnx_and_manifest(tiny_files, tmp_path, kind):
    out = tmp_path / "model"
    assert export(tiny_files, out, kind, ["--dynamic-batch", "1:3"]) == 0
    assert sorted(os.listdir(out)) == ["manifest.json", "model.onnx"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dirs left behind
    m = Manifest.read(str(out))
    k = 1 if kind == "crane" else 2
    assert json.loads((out / "manifest.json").read_text())["schema_version"] == SCHEMA_VERSION
    assert m.model.kind == kind and m.model.arch == TINY and len(m.model.class_names) == k
    assert m.input.dtype == "uint8" and m.input.shape == ["batch", 56, 56, 3]
    assert m.outputs[0].shape == ["batch", k, 56, 56] and (m.batch.min, m.batch.max, m.batch.opt) == (1, 3, 1)
    assert m.files["model.onnx"].sha256 == sha256_file(str(out / "model.onnx"))
    parity = m.parity
    assert parity.passed and parity.comparison.map_error_over_range <= 1e-4 and parity.failures == []
    assert parity.comparison.image_score.max_abs <= 1e-5 and parity.comparison.images == 3
    assert len(parity.comparison.map_pearson) == 3 and min(parity.comparison.map_pearson) > 0.999999
    assert m.sources["checkpoint"] is None or m.sources["checkpoint"]["path"]
    assert len(m.model.anchor_sha256) == 64 and "torch" in m.export["versions"]

    graph = onnx.load(str(out / "model.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert "Attention" not in ops and "If" not in ops and "Loop" not in ops and "Einsum" not in ops
    assert "LayerNormalization" in ops
    assert ("ReduceMean" in ops) == (kind == "aaclip")  # only AA-CLIP's detection-token mean; no decomposed LN
    assert "Pow" not in ops  # no decomposed LayerNorm
    assert 17 <= graph.opset_import[0].version <= 20
    names = [i.name for i in graph.graph.input], [o.name for o in graph.graph.output]
    assert names == (["images"], ["anomaly_map", "image_score"])
    # Text anchors are constants in the graph: no text tower, no token embedding table.
    sizes = [np.prod(i.dims) for i in graph.graph.initializer]
    assert max(sizes) < 49408 * 48


def test_random_init_is_loud_and_recorded(tiny_files, tmp_path, caplog):
    out = tmp_path / "r"
    args = ["--model", "clip", "--arch", TINY, "--image-size", "56", "--random-init", "--seed", "4",
            "--class-name", "tile", "--output", str(out)]
    assert export_cli.main(args) == 0
    assert "RANDOM" in caplog.text
    m = Manifest.read(str(out))
    assert m.model.random_init is True and m.sources["clip_weights"] == {"random_init": True, "seed": 4}


def test_failed_export_leaves_previous_output_intact(tiny_files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "model"
    assert export(tiny_files, out, "clip") == 0
    before = (out / "manifest.json").read_text()
    # A bad argument fails before anything is written …
    assert export(tiny_files, out, "aaclip", ["--epoch", "99"]) == 2
    assert "no image_adapter_99.pth" in capsys.readouterr().err
    # … and a failure in the middle of the export (here: the parity gate) leaves the old directory as it was.
    monkeypatch.setattr(onnx_export, "PARITY_LIMITS", GateLimits(score_max_abs=-1.0))  # cannot pass
    assert export(tiny_files, out, "aaclip") == 2
    assert "parity gate failed" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_failed_parity_is_kept_only_when_accepted_and_then_recorded(tiny_files, tmp_path, capsys, caplog,
                                                                    monkeypatch):
    """A parity failure names the model's known reason where it has one (Crane+'s hard D-Attn threshold); with
    --accept-accuracy-loss the export is written and its manifest says the gate failed and was accepted."""
    from clipad.export.models.registry import get_kind

    monkeypatch.setattr(onnx_export, "PARITY_LIMITS", GateLimits(score_max_abs=-1.0))  # cannot pass
    assert export(tiny_files, tmp_path / "m", "clip") == 2
    err = capsys.readouterr().err
    assert "parity gate failed" in err and "nothing written" in err and not (tmp_path / "m").exists()
    assert "hard threshold" in get_kind("crane_plus").parity_note and get_kind("clip").parity_note == ""
    assert export(tiny_files, tmp_path / "m", "clip", ["--accept-accuracy-loss"]) == 0
    assert "WARNING: parity gate failed" in caplog.text
    parity = json.loads((tmp_path / "m" / "manifest.json").read_text())["parity"]
    assert parity["passed"] is False and parity["accepted_despite_failure"] is True


def test_failed_first_export_leaves_nothing(tiny_files, tmp_path, monkeypatch):
    out = tmp_path / "fresh"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "export_onnx", boom)
    assert export(tiny_files, out, "clip") == 130
    assert os.listdir(tmp_path) == []


def test_refuses_to_replace_a_foreign_directory(tiny_files, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export(tiny_files, out, "clip") == 2
    assert "refusing" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"


def test_bad_batch_arguments(tiny_files, tmp_path, capsys):
    assert export(tiny_files, tmp_path / "a", "clip", ["--dynamic-batch", "4:2"]) == 2
    assert export(tiny_files, tmp_path / "b", "clip", ["--dynamic-batch", "x"]) == 2
    assert export(tiny_files, tmp_path / "c", "clip", ["--batch", "0"]) == 2
    assert os.listdir(tmp_path) == []
    err = capsys.readouterr().err
    assert err.count("export-engine: error:") == 3 and "Traceback" not in err


def test_verify_images_folder(tiny_files, tmp_path):
    from clipad.calibration.samples import write_samples

    write_samples(str(tmp_path / "v"), count=3)
    assert export(tiny_files, tmp_path / "m", "clip", ["--verify-images", str(tmp_path / "v"), "--batch", "2"]) == 0
    m = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert m["parity"]["comparison"]["images"] == 3 and len(m["parity"]["comparison"]["names"]) == 3
    assert m["input"]["shape"][0] == 2
