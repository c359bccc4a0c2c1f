"""The INT8 file made again with its most decision-sensitive linear layers float, after its gate failed: measure
(``int8_sensitivity``), then keep 1, 2, 4 … of the worst groups float until the gate passes or a quarter of the CLIP
tower's linear layers would be float. Every round is recorded in the manifest's conversion entry."""
from __future__ import annotations

import logging

import numpy as np

from . import int8_sensitivity as sensitivity

log = logging.getLogger("clipad")
NORMAL_IMAGES, VERIFY_IMAGES = 3, 2   # per group pass: ViT-L@518 on 2 cores, ~30 s a group, ~27 groups


def keep_sensitive_float(precision: str, fp32_file: str, conversion: dict, convert_file, run_gate, first_report,
                         normals: np.ndarray, verify: np.ndarray, batch_min: int, rule: str):
    """(gate report, conversion entry) of the last round; the first passing round ends the search."""
    import onnx
    from tqdm import tqdm

    from clipad.calibration.images import evenly_spaced

    from .convert import linear_nodes
    from .onnx_graph import scopes as _scopes

    graph = onnx.load(fp32_file, load_external_data=False)
    already = set(conversion.get("kept_float_nodes") or [])
    ordered = linear_nodes(graph)
    linears = set(ordered)
    clip = {n.name for n in graph.graph.node if n.name in linears and sensitivity.DINO_SCOPE not in _scopes(n)}
    clip_layers, clip_already = len(clip), len(clip & already)
    groups = sensitivity.make_groups(graph, [n for n in ordered if n not in already])
    groups_total = len(groups)
    del graph
    if not groups_total:
        log.info("      no quantized MatMul layer left to measure; the gate's verdict stands")
        return first_report, conversion
    images = np.concatenate([evenly_spaced(normals, NORMAL_IMAGES), evenly_spaced(verify, VERIFY_IMAGES)])
    normals_used = min(NORMAL_IMAGES, len(normals))
    log.info("[3d] %s gate failed (%s): measuring each group of %d linear layers' effect on the decision score "
             "(%d images) …", precision.upper(), "; ".join(first_report.failures), sensitivity.GROUP_SIZE,
             len(images))
    with tqdm(total=groups_total + 1, desc="INT8 sensitivity", unit="pass", leave=False,
              disable=not log.isEnabledFor(logging.INFO)) as bar:
        groups = sensitivity.measure(fp32_file, groups, images, batch_min, rule, normals_used, bar.update)
    for g in groups[:5]:
        log.info("      %-48s effect %.3f", g.name[:48], g.effect)
    rounds, report, kept = [], first_report, []
    for kept in sensitivity.keep_order(groups, clip_layers, clip_already):
        layers = tuple(n for g in kept for n in g.layers)
        log.info("      %s again with %d group(s) (%d layers) float …", precision.upper(), len(kept), len(layers))
        conversion = convert_file(layers)
        report = run_gate()
        decision = report.decision
        rounds.append({"kept_groups": len(kept), "kept_layers": len(layers), "passed": report.passed,
                       "failures": list(report.failures),
                       "map_pearson_min": report.comparison.map_pearson_min,
                       "verify_flips": list(decision.verify_flips) if decision is not None else None})
        log.info("      %s (map Pearson min %s)", "passes" if report.passed else "fails: " + "; ".join(report.failures),
                 "–" if report.comparison.map_pearson_min is None else f"{report.comparison.map_pearson_min:.5f}")
        if report.passed:
            break
    if not rounds:
        log.info("      no group fits within a quarter of the CLIP tower's %d linear layers (%d float already)",
                 clip_layers, clip_already)
    # the file written is the last round's (or the first, without rounds): what it keeps float is recorded
    conversion["sensitivity"] = sensitivity.record(groups, kept if rounds else [], rounds, len(images))
    conversion["sensitivity"]["passed"] = bool(report.passed)
    conversion["sensitivity"].update(clip_linear_layers=clip_layers, clip_float_before=clip_already)
    return report, conversion
