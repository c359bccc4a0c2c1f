"""The INT8 sensitivity pass (export/int8_sensitivity.py, int8_sensitivity_step.py): the switched graph is the FP32
model with every switch off and ONNX Runtime's dynamic INT8 with a group's switch on; a failed INT8 gate keeps the
worst group float and gates again, records every group's effect and each round, and stops at a quarter of the CLIP
tower's linear layers."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from clipad.export import convert, int8_sensitivity
from clipad.export.int8_sensitivity import Group, keep_order
from tiny_fixtures import export_tiny, images


@pytest.fixture(scope="module")
def fp32(tiny_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("sens") / "m"
    assert export_tiny(tiny_files, out, "clip", ["--no-engine"], classes=("tile",)) == 0
    return out / "model.onnx"


@pytest.fixture(scope="module")
def normals(tmp_path_factory):
    from clipad.calibration.samples import write_samples

    folder = tmp_path_factory.mktemp("normals")
    write_samples(str(folder), count=24, seed=5)
    return folder


def run(path, x, switches=None):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"images": x}
    if switches is not None:
        feed[int8_sensitivity.SWITCHES] = switches
    return session.run(["anomaly_map"], feed)[0]


def test_switched_graph_is_fp32_off_and_onnxruntime_dynamic_int8_on(fp32, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32))
    groups = int8_sensitivity.make_groups(model, convert.linear_nodes(model))
    assert len(groups) >= 2 and all(0 < len(g.layers) <= int8_sensitivity.GROUP_SIZE for g in groups)
    switched = tmp_path / "switched.onnx"
    int8_sensitivity.write_switched_copy(str(fp32), str(switched), groups)
    x = images(1, 56, seed=9)
    want = run(fp32, x)
    off = np.zeros(len(groups), np.float32)
    np.testing.assert_allclose(run(switched, x, off), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    on = off.copy()
    on[0] = 1.0
    fake = run(switched, x, on)
    quantize_dynamic(str(fp32), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                     nodes_to_quantize=groups[0].layers, op_types_to_quantize=["MatMul"],
                     extra_options={"MatMulConstBOnly": True})
    real = run(tmp_path / "q.onnx", x)
    moved = np.abs(real - want).max()
    assert moved > 0                                              # the group's quantization is visible …
    assert np.abs(fake - real).max() <= 0.05 * moved              # … and the switch reproduces it


def test_with_calibrated_ranges_the_switch_reproduces_the_static_qdq_file(fp32, tmp_path):
    """For a static Q/DQ file the switch rounds each activation at the file's own calibrated scale: group 0 switched
    on matches quantize_static's file of that group alone far closer than the dynamic rounding does."""
    from clipad.export.precision_step import static_activation_absmax
    from clipad.export.options import CalibrationOptions

    model = onnx.load(str(fp32))
    groups = int8_sensitivity.make_groups(model, convert.linear_nodes(model))
    calib = images(6, 56, seed=4)
    absmax = static_activation_absmax(str(fp32), calib, CalibrationOptions(data="unused"), 1)
    assert all(np.isfinite(v) and v > 0 for v in absmax.values())
    assert {n.input[0] for n in model.graph.node if n.name in groups[0].layers} <= set(absmax)
    _, _, ranges = convert.calibrate(str(fp32), calib, "minmax", 1, None)
    qdq = tmp_path / "qdq.onnx"
    made = convert._quantize_static(str(fp32), str(qdq), groups[0].layers, ranges)
    convert.keep_float_consumers(made, set(groups[0].layers))      # as convert.to_int8 writes it
    onnx.save(made, str(qdq))
    scales = {n.input[0]: onnx.numpy_helper.to_array(init).item()
              for n in onnx.load(str(qdq)).graph.node if n.op_type == "QuantizeLinear"
              for init in onnx.load(str(qdq)).graph.initializer if init.name == n.input[1] and init.dims == []}
    for x, scale in scales.items():
        assert scale == pytest.approx(float(int8_sensitivity.static_scale(absmax[x])), rel=1e-6)
    x = images(1, 56, seed=9)
    want, real = run(fp32, x), run(qdq, x)
    on = np.zeros(len(groups), np.float32)
    on[0] = 1.0
    static, dynamic = tmp_path / "static.onnx", tmp_path / "dynamic.onnx"
    int8_sensitivity.write_switched_copy(str(fp32), str(static), groups, absmax)
    int8_sensitivity.write_switched_copy(str(fp32), str(dynamic), groups)
    moved = np.abs(real - want).max()
    assert moved > 0
    assert np.abs(run(static, x, on) - real).max() <= 0.05 * moved
    assert np.abs(run(dynamic, x, on) - real).max() > 0.05 * moved    # the dynamic rounding is another file's
    np.testing.assert_allclose(run(static, x, on * 0), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_keep_order_doubles_within_a_quarter_of_the_clip_tower():
    groups = [Group(f"g{i}", "dino" if i == 1 else "clip", [f"n{i}a", f"n{i}b"]) for i in range(8)]
    sets = keep_order(groups, clip_layers=16)                      # at most 4 CLIP layers float
    assert [len(s) for s in sets] == [1, 2, 3]                     # doubling, then the largest set that fits:
                                                                   # 4 groups would be 3 CLIP groups = 6 layers
    assert sets[1][1].tower == "dino"                              # the DINOv2 tower is counted apart
    assert keep_order(groups, clip_layers=16, already=3) == []      # the head projections count


class ScriptedGate:
    """The real gate, but its verdict scripted per call (a test double: the tiny model's INT8 gate result is not
    under the test's control)."""

    def __init__(self, monkeypatch, verdicts):
        self.real, self.verdicts, self.calls = convert.precision_gate, list(verdicts), 0
        self.images, self.fp32_runs = [], []
        monkeypatch.setattr(convert, "precision_gate", self)

    def __call__(self, *args, **kwargs):
        report = self.real(*args, **kwargs)
        self.images.append(len(args[3]))                         # the gate images of this call
        reference = kwargs.get("reference")
        self.fp32_runs.append(None if reference is None else (id(reference), reference.images_run))
        verdict = self.verdicts[min(self.calls, len(self.verdicts) - 1)]
        self.calls += 1
        report.passed = verdict
        report.failures = [] if verdict else ["scripted failure (test double)"]
        return report


def test_failed_gate_keeps_the_worst_group_float(tiny_files, tmp_path, normals, monkeypatch):
    monkeypatch.setattr(int8_sensitivity, "GROUP_SIZE", 1)      # the tiny tower has too few layers for 4 a group
    gate = ScriptedGate(monkeypatch, [False, True])
    out = tmp_path / "m"
    assert export_tiny(tiny_files, out, "clip", ["--precision", "int8-cpu", "--calib-data", str(normals),
                                                 "--no-engine"], classes=("tile",)) == 0
    assert gate.calls == 2
    conversion = json.loads((out / "manifest.json").read_text())["precisions"]["int8-cpu"]["conversion"]
    s = conversion["sensitivity"]
    effects = [g["effect"] for g in s["groups"]]
    assert effects == sorted(effects, reverse=True) and all(np.isfinite(effects)) and effects[0] > 0
    assert s["kept_groups"] == [s["groups"][0]["name"]] and s["rounds"][0]["passed"]
    (round_1,) = s["rounds"]
    report = json.loads((out / "manifest.json").read_text())["precisions"]["int8-cpu"]["gate"]
    assert round_1 == {"kept_groups": 1, "kept_layers": len(s["groups"][0]["layers"]), "passed": True,
                       "failures": [], "map_pearson_min": report["comparison"]["map_pearson_min"],
                       "verify_flips": report["decision"]["verify_flips"]}  # numbers per round
    assert 0 < round_1["map_pearson_min"] <= 1
    kept = set(s["groups"][0]["layers"])
    assert kept <= set(conversion["kept_float_nodes"])
    graph = onnx.load(str(out / "model.int8-cpu.onnx"))
    plain = {n.name for n in graph.graph.node if n.op_type == "MatMul"}
    assert kept <= plain                                           # still float MatMuls in the written file
    assert any(n.op_type in ("DynamicQuantizeMatMul", "MatMulInteger") for n in graph.graph.node)
    assert "dynamic activations" in s["method"]


def test_a_static_qdq_file_is_measured_at_its_calibrated_scales(tiny_files, tmp_path, normals, monkeypatch):
    """The Q/DQ file's pass rounds at the ranges the file was made with (recorded in the manifest); the
    ONNX Runtime dynamic file's pass keeps the dynamic rounding (test_failed_gate_keeps_the_worst_group_float)."""
    monkeypatch.setattr(int8_sensitivity, "GROUP_SIZE", 1)
    seen = []
    real_measure = int8_sensitivity.measure

    def spy(*args, **kwargs):
        seen.append(kwargs.get("activation_absmax"))
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(int8_sensitivity, "measure", spy)
    ScriptedGate(monkeypatch, [False, True])
    out = tmp_path / "m"
    assert export_tiny(tiny_files, out, "clip", ["--precision", "int8", "--calib-data", str(normals),
                                                 "--no-engine"], classes=("tile",)) == 0
    (absmax,) = seen
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    inputs = {n.input[0] for n in graph.graph.node if n.name in convert.linear_nodes(graph)}
    assert inputs <= set(absmax) and all(v > 0 for v in absmax.values())
    s = json.loads((out / "manifest.json").read_text())["precisions"]["int8"]["conversion"]["sensitivity"]
    assert "static activations at the calibrated scales" in s["method"]


@pytest.mark.parametrize("final", [True, False, None], ids=["passes", "fails-held-out", "never-passes"])
def test_the_kept_set_is_chosen_on_half_the_verify_images_and_judged_on_all(tiny_files, tmp_path, normals,
                                                                             monkeypatch, capsys, final):
    """With ≥ 10 verify images the pass measures and gates its rounds on every second one, then judges the last
    round's file on all of them; the held-out half's flips are recorded, a failure there fails the export, and the
    FP32 side runs each image once for all the gates."""
    from clipad.calibration.samples import write_samples
    from clipad.export import int8_sensitivity_step

    assert [list(p) for p in int8_sensitivity_step.split_verify(5)] == [[0, 1, 2, 3, 4], []]
    assert [list(p) for p in int8_sensitivity_step.split_verify(11)] == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9]]
    monkeypatch.setattr(int8_sensitivity, "GROUP_SIZE", 1)
    verify = tmp_path / "verify"
    write_samples(str(verify), count=10, seed=11)
    gate = ScriptedGate(monkeypatch, [False] if final is None else [False, True, final])
    out = tmp_path / "m"
    batching = ["--dynamic-batch", "1:4"] if final else []   # the halves then batch the images differently
    code = export_tiny(tiny_files, out, "clip", ["--precision", "int8-cpu", "--calib-data", str(normals),
                                                 "--verify-images", str(verify), "--no-engine", *batching],
                       classes=("tile",))
    rounds = gate.calls - 2
    assert rounds >= (2 if final is None else 1)
    assert gate.images == [10] + [5] * rounds + [10]               # all, the choosing half per round, all
    (reference, ran), *later = gate.fp32_runs
    assert ran > 0 and later == [(reference, ran)] * (rounds + 1)  # one FP32 side; no image run twice
    err = capsys.readouterr().err
    if not final:
        assert code == 2 and not out.exists()
        held_out = "passed on the 5 verify images that chose them, not with the 5 held out"
        assert (held_out in err) == (final is False)
        return
    assert code == 0
    entry = json.loads((out / "manifest.json").read_text())["precisions"]["int8-cpu"]
    s = entry["conversion"]["sensitivity"]
    assert s["chosen_on_verify_images"] == 5 and s["passed"]
    verdict, (round_1,) = s["held_out_verdict"], s["rounds"]
    assert round_1["passed"] and round_1["verify_flips"] is not None
    assert verdict["verify_images"] == 10 and verdict["held_out_images"] == 5 and verdict["passed"]
    assert verdict["verify_flips"] == entry["gate"]["decision"]["verify_flips"]   # the verdict is the gate's
    assert entry["gate"]["decision"]["verify_images"] == 10
    assert all(0 <= h <= a for h, a in zip(verdict["held_out_flips"], verdict["verify_flips"]))
    assert "verify_flipped" not in entry["gate"]["decision"]


def test_the_held_out_flips_are_counted_by_image():
    """The held-out half's flips come from which images flipped in the final gate, not from a difference of counts
    (a backend that decided an image differently in two gates could make that negative)."""
    from types import SimpleNamespace

    from clipad.export.int8_sensitivity_step import held_out_verdict
    from clipad.runtime.decision_check import check

    normal = np.linspace(0, 1, 40)[:, None]
    verify = np.array([[0.99], [0.99], [0.2], [0.98], [2.0], [0.985]])
    moved = verify - np.array([[0.5], [0.5], [0.0], [0.5], [0.0], [0.0]])   # images 0, 1, 3 drop below
    pairs = lambda s: (np.zeros_like(s), s)  # noqa: E731
    decision = check("image_score", pairs(normal), pairs(normal), pairs(verify), pairs(moved))
    assert decision.verify_flips == [3, 3]
    final = SimpleNamespace(passed=False, failures=["x"], comparison=SimpleNamespace(map_pearson_min=0.99),
                            decision=decision)
    verdict = held_out_verdict(final, 6, np.array([1, 3, 5]))
    assert verdict["held_out_flips"] == [2, 2] and verdict["verify_flips"] == [3, 3]
    assert verdict["held_out_images"] == 3 and verdict["passed"] is False


@pytest.mark.parametrize("flag", [[], ["--no-int8-sensitivity"]])
def test_a_gate_that_never_passes_stops_at_the_cap(tiny_files, fp32, tmp_path, normals, monkeypatch, capsys,
                                                   flag):
    monkeypatch.setattr(int8_sensitivity, "GROUP_SIZE", 1)
    gate = ScriptedGate(monkeypatch, [False])
    out = tmp_path / "m"
    assert export_tiny(tiny_files, out, "clip", ["--precision", "int8-cpu", "--calib-data", str(normals),
                                                 "--no-engine", *flag], classes=("tile",)) == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert "INT8-CPU accuracy gate failed: scripted failure" in err
    if flag:
        assert gate.calls == 1
    else:
        model = onnx.load(str(fp32))
        linears = convert.linear_nodes(model)
        head = convert.head_feeding_linears(model)
        candidates = [n for n in linears if n not in head]
        rounds = keep_order(int8_sensitivity.make_groups(model, candidates), len(linears), len(head))
        assert len(rounds) >= 1 and len(rounds[-1]) + len(head) <= len(linears) // 4
        assert gate.calls == 1 + len(rounds)                        # 1 layer, 2 layers, … within a quarter


def test_a_kept_failure_records_what_its_file_keeps_float(tiny_files, tmp_path, normals, monkeypatch):
    """--accept-accuracy-loss keeps the last round's file: the manifest names that round's float layers."""
    monkeypatch.setattr(int8_sensitivity, "GROUP_SIZE", 1)
    ScriptedGate(monkeypatch, [False])
    out = tmp_path / "m"
    assert export_tiny(tiny_files, out, "clip", ["--precision", "int8-cpu", "--calib-data", str(normals),
                                                 "--no-engine", "--accept-accuracy-loss"], classes=("tile",)) == 0
    entry = json.loads((out / "manifest.json").read_text())["precisions"]["int8-cpu"]
    s = entry["conversion"]["sensitivity"]
    assert s["passed"] is False and s["rounds"] and not any(r["passed"] for r in s["rounds"])
    assert len(s["kept_groups"]) == s["rounds"][-1]["kept_groups"]
    assert set(s["kept_layers"]) <= set(entry["conversion"]["kept_float_nodes"])
    graph = onnx.load(str(out / "model.int8-cpu.onnx"))
    assert set(s["kept_layers"]) <= {n.name for n in graph.graph.node if n.op_type == "MatMul"}
    assert entry["gate"]["accepted_despite_failure"]


def test_keep_float_takes_a_manifests_node_names_and_refuses_what_matches_nothing(fp32, tmp_path):
    """What a sensitivity pass kept (the manifest's kept_float_nodes) can be handed to the next INT8 file with
    --int8-keep-float, so the other file of the pair need not measure again; scopes still work, typos are refused."""
    from clipad.runtime.errors import ClipadError

    model = onnx.load(str(fp32), load_external_data=False)
    linears = convert.linear_nodes(model)
    picked = (linears[0], linears[-1])
    assert convert.kept_by_keep_float(model, picked) == set(picked)
    by_scope = convert.kept_by_keep_float(model, ("mlp.c_proj",))
    assert by_scope and by_scope < set(linears)
    with pytest.raises(ClipadError, match="node_MatMul_99999.*kept_float_nodes"):
        convert.kept_by_keep_float(model, (linears[0], "node_MatMul_99999"))
    made = convert.to_int8_dynamic(str(fp32), str(tmp_path / "q.onnx"), keep_float=picked)
    assert set(picked) <= set(made["kept_float_nodes"]) and made["kept_float"] == list(picked)
    quantized = {n.name for n in onnx.load(str(tmp_path / "q.onnx")).graph.node if n.op_type == "MatMulInteger"}
    assert quantized and not any(name == p or name.startswith(p + "_") for name in quantized for p in picked)
    assert made["quantized_nodes"] == len(set(linears) - set(made["kept_float_nodes"]))


def test_keep_float_from_another_int8_file_of_the_export(tiny_files, normals, tmp_path, capsys):
    """--int8-keep-float from:int8-cpu gives the Q/DQ file exactly the layers the export's int8-cpu file kept float;
    naming a precision the export lacks, or using it without an export to read, is one clear error."""
    from clipad.export import cli as export_cli

    out = tmp_path / "m"
    assert export_tiny(tiny_files, out, "clip", ["--no-engine"], classes=("tile",)) == 0
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    picked = convert.linear_nodes(model)[1:3]
    base = ["--from-onnx", str(out), "--no-engine", "--accept-accuracy-loss", "--no-int8-sensitivity", "-q"]
    assert export_cli.main(base + ["--precision", "int8", "--int8-keep-float", "from:int8-cpu",
                                   "--calib-data", str(normals)]) == 2
    assert "no 'int8-cpu' file" in capsys.readouterr().err
    assert export_cli.main(base + ["--precision", "int8-cpu", "--int8-keep-float", *picked]) == 0
    assert export_cli.main(base + ["--precision", "int8", "--int8-keep-float", "from:int8-cpu",
                                   "--calib-data", str(normals)]) == 0
    entries = json.loads((out / "manifest.json").read_text())["precisions"]
    kept = entries["int8-cpu"]["conversion"]["kept_float_nodes"]
    assert set(picked) <= set(kept) and entries["int8"]["conversion"]["kept_float_nodes"] == kept
    qdq = onnx.load(str(out / "model.int8.onnx"), load_external_data=False)
    fed_by_dq = {n.name for n in qdq.graph.node if n.op_type == "MatMul"
                 and any(i.endswith("_DequantizeLinear_Output") or "dequant" in i.lower() for i in n.input)}
    assert fed_by_dq and not set(picked) & fed_by_dq
    assert export_tiny(tiny_files, tmp_path / "n", "clip", ["--no-engine", "--int8-keep-float", "from:int8-cpu"],
                       classes=("tile",)) == 2
    assert "use it with --from-onnx" in capsys.readouterr().err


def test_the_recorded_fp32_side_runs_an_image_once_within_its_cap():
    """The gate's FP32 side keeps each image's outputs (the same bytes give the same outputs, in whatever batch) up to
    its byte cap, and past it runs the image again rather than grow; close releases the session, not what it kept."""
    from clipad.export.gate_reference import RecordedReference

    class CountingBackend:   # a fake backend: outputs derived from each input row, sessions counted
        opened = closed = 0

        def __init__(self):
            CountingBackend.opened += 1

        def run(self, batch):
            return (batch.astype(np.float32) * 2, batch.reshape(len(batch), -1).sum(axis=1, dtype=np.float32))

        def close(self):
            CountingBackend.closed += 1

    a, b, c = images(3, 8, seed=1)
    per_image = a.size * 4 + 4
    ref = RecordedReference(CountingBackend, (1, 2), limit_bytes=2 * per_image)
    first = ref.run(np.stack([a, b]))
    np.testing.assert_array_equal(first[0], np.stack([a, b]) * 2.0)
    ref.close()
    again = ref.run(np.stack([b.copy(), a.copy()]))     # the same images in another batch: recorded, no session
    np.testing.assert_array_equal(again[0], np.stack([b, a]) * 2.0)
    np.testing.assert_array_equal(again[1], np.stack([b, a]).reshape(2, -1).sum(axis=1))
    assert ref.images_run == 2 and CountingBackend.opened == 1
    ref.run(np.stack([b, c]))                            # c is new: the batch runs; past the cap c is not kept
    ref.run(c[None])
    assert ref.images_run == 5 and ref.bytes_kept == 2 * per_image and CountingBackend.opened == 2
    ref.close()
    assert CountingBackend.closed == 2


def test_the_groups_are_ranked_by_the_map_when_the_map_is_all_that_failed():
    """A gate that failed on the map with its decisions holding (e.g. under --int8-map-min) ranks by map effect;
    a decision failure, alone or with the map's, ranks by the decision score."""
    from types import SimpleNamespace

    from clipad.export.int8_sensitivity_step import ranking
    from clipad.runtime.compare import GateLimits

    def report(map_min, decision_limits):
        limits = GateLimits(map_pearson_min=0.995, **({"decision_flips_max": 0} if decision_limits else {}))
        comparison = SimpleNamespace(map_pearson_min=map_min, map_pearson=[] if map_min is None else [1.0, map_min])
        return SimpleNamespace(limits=limits, comparison=comparison, decision=None)

    assert ranking(report(0.99464, decision_limits=False)) == "map"
    assert ranking(report(None, decision_limits=False)) == "map"       # no map at all counts as a map failure
    assert ranking(report(0.99464, decision_limits=True)) == "decision"   # the decision check failed (none ran)
    assert ranking(report(0.9990, decision_limits=True)) == "decision"
    assert ranking(report(0.9990, decision_limits=False)) == "decision"   # nothing map-wise to fix


def test_each_group_has_a_map_effect_and_the_map_ranking_orders_by_it(fp32, normals):
    from clipad.calibration.images import load_set

    model = onnx.load(str(fp32))
    groups = int8_sensitivity.make_groups(model, convert.linear_nodes(model))
    x, _ = load_set(str(normals), 56, None, min_images=2)
    x = np.concatenate([x[:3], images(2, 56, seed=4)])
    by_map = int8_sensitivity.measure(str(fp32), groups, x, 1, "map_max", 3, rank_by="map")
    effects = [g.map_effect for g in by_map]
    assert all(0.0 < e <= 2.0 for e in effects) and effects == sorted(effects, reverse=True)
    by_decision = int8_sensitivity.measure(str(fp32), groups, x, 1, "map_max", 3)
    assert [g.effect for g in by_decision] == sorted((g.effect for g in by_decision), reverse=True)
    assert {g.name: g.map_effect for g in by_decision} == pytest.approx({g.name: g.map_effect for g in by_map})


def test_int8_map_min_raises_the_map_limit_and_is_recorded(tiny_files, tmp_path, normals, monkeypatch, capsys):
    """--int8-map-min holds the INT8 gate's map Pearson to a stricter limit (the manifest's limits say which) and
    the sensitivity pass records each group's map effect and what it ranked by."""
    monkeypatch.setattr(int8_sensitivity, "GROUP_SIZE", 1)
    out = tmp_path / "m"
    args = ["--precision", "int8-cpu", "--calib-data", str(normals), "--no-engine"]
    assert export_tiny(tiny_files, out, "clip", [*args, "--int8-map-min", "1.0"], classes=("tile",)) == 2
    assert "need ≥ 1.0" in capsys.readouterr().err and not out.exists()   # no INT8 file has a map Pearson of 1
    assert export_tiny(tiny_files, out, "clip", [*args, "--int8-map-min", "1.0", "--accept-accuracy-loss"],
                       classes=("tile",)) == 0
    entry = json.loads((out / "manifest.json").read_text())["precisions"]["int8-cpu"]
    assert entry["gate"]["limits"]["map_pearson_min"] == 1.0 and entry["gate"]["accepted_despite_failure"]
    s = entry["conversion"]["sensitivity"]
    assert s["ranked_by"] in ("map_effect", "effect") and s["rounds"]
    assert all(np.isfinite(g["map_effect"]) and g["map_effect"] > 0 for g in s["groups"])
    ranked = [g[s["ranked_by"]] for g in s["groups"]]
    assert ranked == sorted(ranked, reverse=True)


@pytest.mark.parametrize("extra, said", [
    (["--precision", "bf16", "--int8-map-min", "0.995"], "applies to the INT8 files, not to --precision bf16"),
    (["--precision", "int8-cpu", "--int8-map-min", "0.98"], "must lie between the INT8 gate's own 0.99 and 1"),
    (["--precision", "int8-cpu", "--int8-map-min", "nan"], "must lie between"),
    (["--precision", "int8-cpu", "--int8-map-min", "1.5"], "must lie between")])
def test_int8_map_min_refuses_what_would_loosen_or_not_apply(tiny_files, tmp_path, normals, capsys, extra, said):
    out = tmp_path / "m"
    assert export_tiny(tiny_files, out, "clip", [*extra, "--calib-data", str(normals), "--no-engine"],
                       classes=("tile",)) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err and not out.exists()


def test_ranked_by_the_map_the_groups_are_measured_on_the_worst_map_images_of_the_choosing_half():
    from types import SimpleNamespace

    from clipad.export.int8_sensitivity_step import VERIFY_IMAGES, measured_verify

    verify = np.arange(10)[:, None, None, None] * np.ones((10, 2, 2, 3))
    pearson = [0.999, 0.99, 0.998, 0.9901, 0.997, 0.991, 0.9999, 0.992, 0.996, 0.993]
    report = SimpleNamespace(comparison=SimpleNamespace(map_pearson=pearson, names=[f"i{i}" for i in range(10)]))
    choose = np.arange(0, 10, 2)                                    # 0, 2, 4, 6, 8: worst there are 8 and 4
    picked = measured_verify(verify, choose, report, "map")[:, 0, 0, 0]
    assert VERIFY_IMAGES == 2 and picked.tolist() == [4, 8]         # never the held-out 1 and 3, worse as they are
    spread = measured_verify(verify, choose, report, "decision")[:, 0, 0, 0]
    assert spread.tolist() == [0, 8]                                # by the decision: spread as before


def test_the_images_the_first_gate_failed_on_are_dealt_to_both_halves():
    """Crane's int8-bf16 at ViT-L failed its map on two verify images that both fell in the held-out half, so the
    rounds, gated on the other half, passed at once and never saw the failure: the failing images are now dealt
    alternately, the rest every second."""
    from types import SimpleNamespace

    from clipad.export.int8_sensitivity_step import failed_images, split_verify
    from clipad.runtime.compare import GateLimits

    assert [list(p) for p in split_verify(20, [1, 3])] == [[0, 1, 4, 6, 8, 10, 12, 14, 16, 18],
                                                           [2, 3, 5, 7, 9, 11, 13, 15, 17, 19]]
    choose, held = split_verify(11, [1, 5, 7])
    assert sorted([*choose, *held]) == list(range(11)) and abs(len(choose) - len(held)) <= 1
    assert {1, 7} <= set(choose) and 5 in held                      # alternately, in order
    assert [list(p) for p in split_verify(11, [])] == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9]]
    assert [list(p) for p in split_verify(6, [1])] == [[0, 1, 2, 3, 4, 5], []]   # too few: none held out
    report = SimpleNamespace(limits=GateLimits(map_pearson_min=0.995),
                             comparison=SimpleNamespace(map_pearson=[0.999, 0.991, 0.996, 0.994]),
                             decision=SimpleNamespace(verify_flipped=[[2], [2, 0]]))
    assert failed_images(report) == [0, 1, 2, 3]
    report.decision = None
    assert failed_images(report) == [1, 3]


def test_a_layer_kept_float_reads_the_fp32_weight_it_shares_with_a_quantized_one(tmp_path):
    """Crane's attention paths share each block's out-projection: onnxruntime's QDQ pass leaves the float sharer
    reading the INT8-rounded copy (at ViT-L such a Crane+ int8-bf16 file did not compile in OpenVINO). The written
    file gives it the FP32 weight back, and the BF16 remainder then makes it a BF16 layer like the other float ones."""
    from onnx import TensorProto, helper, numpy_helper

    from clipad.calibration.ranges import activation_tensors, collect_ranges
    from clipad.export.convert_bf16 import bf16_products

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y1"], name="quantized"),
         helper.make_node("Relu", ["y1"], ["r1"], name="relu"),
         helper.make_node("MatMul", ["r1", "W"], ["y2"], name="kept"),
         helper.make_node("Add", ["y2", "y1"], ["out"], name="add")], "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 16])], [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    src = str(tmp_path / "fp32.onnx")
    onnx.save(model, src)
    ranges = collect_ranges(src, activation_tensors(model, ["quantized", "kept"]),
                            [{"x": rng.standard_normal((1, 8, 16)).astype(np.float32)} for _ in range(3)], "minmax")
    made = convert._quantize_static(src, str(tmp_path / "q.onnx"), ["quantized"], ranges)
    convert.keep_float_consumers(made, {"quantized"})
    by = {n.name: n for n in made.graph.node}
    assert by["kept"].input[1].endswith("_DequantizeLinear_Output")         # what onnxruntime leaves
    assert convert.restore_float_weights(made, {"quantized"}, src) == 1
    inits = {i.name: numpy_helper.to_array(i) for i in made.graph.initializer}
    assert by["kept"].input[1] == "W" and np.array_equal(inits["W"], w)
    assert by["quantized"].input[1].endswith("_DequantizeLinear_Output")    # the INT8 layer keeps its INT8 weight
    assert convert.restore_float_weights(made, {"quantized"}, src) == 0      # nothing left to restore
    assert bf16_products(made, attention=True)["bf16_linear_layers"] == 1
