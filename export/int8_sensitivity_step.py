"""The INT8 file made again with its most decision-sensitive linear layers float, after its gate failed: measure
(``int8_sensitivity``), then keep 1, 2, 4 … of the worst groups float until the gate passes or a quarter of the CLIP
tower's linear layers would be float. Every round is recorded in the manifest's conversion entry. The worst are by
the decision score, or by the map when the map is all the first gate failed on (e.g. under --int8-map-min).

With ``HOLD_OUT_FROM`` or more verify images the kept set is chosen on every second one (the measurement and the
rounds see only those) and the last round's file (the passing one, or the largest) is judged again on all of them:
a pass that stops at the first round its own judge accepts overstates the file on images it never saw (AA-CLIP,
seeded ViT-L: 20/20 kept on the images that chose the set, 76/80 on the others). The verdict on all the images is
the gate's; the manifest records the flips on the held-out half."""
from __future__ import annotations

import logging

import numpy as np

from . import int8_sensitivity as sensitivity

log = logging.getLogger("clipad")
NORMAL_IMAGES, VERIFY_IMAGES = 3, 2   # per group pass: ViT-L@518 on 2 cores, ~30 s a group, ~27 groups
HOLD_OUT_FROM = 10                    # fewer verify images: chosen and judged on the same ones (said in the log)


def split_verify(count: int, failed=()) -> tuple[np.ndarray, np.ndarray]:
    """(indices the kept set is chosen on, indices held out of the choice): the images the first gate failed on
    (``failed``) dealt alternately to both halves, so the rounds see some of what failed and the held-out half
    judges the rest; the others every second (each to the smaller half), so a folder sorted by class gives both
    halves the same mix. Without ``failed``: every second image."""
    every = np.arange(count)
    if count < HOLD_OUT_FROM:
        return every, every[:0]
    failing = sorted({int(i) for i in failed if 0 <= int(i) < count})
    choose, held = failing[0::2], failing[1::2]
    for i in sorted(set(range(count)) - set(failing)):
        (choose if len(choose) <= len(held) else held).append(i)
    return np.array(sorted(choose), dtype=int), np.array(sorted(held), dtype=int)


def failed_images(report) -> list[int]:
    """Verify images the gate failed on: a map Pearson under its limit, or an OK/NG flip at any α."""
    flipped = [j for per_alpha in (report.decision.verify_flipped if report.decision is not None else [])
               for j in per_alpha]
    return sorted(set(low_map_images(report)) | set(flipped))


def low_map_images(report) -> list[int]:
    """Verify images whose map Pearson is under the gate's limit."""
    limit = report.limits.map_pearson_min
    return [i for i, p in enumerate(report.comparison.map_pearson) if limit is not None and not p >= limit]


def keep_sensitive_float(precision: str, fp32_file: str, conversion: dict, convert_file, run_gate, first_report,
                         normals: np.ndarray, verify: np.ndarray, batch_min: int, rule: str,
                         activation_absmax: dict | None = None):
    """(gate report, conversion entry) of the last round; the first passing round ends the search.
    ``activation_absmax``: a static Q/DQ file's calibrated activation ranges, which the measurement then rounds at
    (``int8_sensitivity``)."""
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
    rank_by = ranking(first_report)
    failed = failed_images(first_report)
    choose, held_out = split_verify(len(verify), failed)
    normals_used = min(NORMAL_IMAGES, len(normals))
    log.info("[3d] %s gate failed (%s): measuring each group of %d linear layers' effect on the %s (%d images, %s "
             "activation rounding) …", precision.upper(), "; ".join(first_report.failures), sensitivity.GROUP_SIZE,
             "map" if rank_by == "map" else "decision score", normals_used + min(VERIFY_IMAGES, len(choose)),
             "the file's static" if activation_absmax else "dynamic")
    dealt = f"; the {len(failed)} the first gate failed on dealt to both halves" if len(failed) > 1 else ""
    log.info("      the kept set is chosen on %s", f"{len(choose)} of the {len(verify)} verify images (every second"
             f"{dealt}); the other half judges it with them" if len(held_out) else
             f"all {len(verify)} verify images, which also judge it (fewer than {HOLD_OUT_FROM}: none held out)")
    images = np.concatenate([evenly_spaced(normals, NORMAL_IMAGES), measured_verify(verify, choose, first_report,
                                                                                    rank_by)])
    with tqdm(total=groups_total + 1, desc="INT8 sensitivity", unit="pass", leave=False,
              disable=not log.isEnabledFor(logging.INFO)) as bar:
        groups = sensitivity.measure(fp32_file, groups, images, batch_min, rule, normals_used, bar.update,
                                     rank_by=rank_by, activation_absmax=activation_absmax)
    for g in groups[:5]:
        log.info("      %-48s effect %.3f, map effect %.5f", g.name[:48], g.effect, g.map_effect)
    rounds, report, kept = [], first_report, []
    for kept in sensitivity.keep_order(groups, clip_layers, clip_already):
        layers = tuple(n for g in kept for n in g.layers)
        log.info("      %s again with %d group(s) (%d layers) float …", precision.upper(), len(kept), len(layers))
        conversion = convert_file(layers)
        report = run_gate(choose if len(held_out) else None)
        decision = report.decision
        rounds.append({"kept_groups": len(kept), "kept_layers": len(layers), "passed": report.passed,
                       "failures": list(report.failures),
                       "map_pearson_min": report.comparison.map_pearson_min,
                       "verify_flips": list(decision.verify_flips) if decision is not None else None})
        on = f"on the {len(choose)} choosing images, " if len(held_out) else ""
        said = "passes" if report.passed else "fails: " + "; ".join(report.failures)
        map_min = report.comparison.map_pearson_min
        # a round that passes on every verify image is the gate's verdict: its summary line gives the map
        log.info("      %s%s%s", on, said, "" if report.passed and not len(held_out) else
                 f" (map Pearson min {'–' if map_min is None else f'{map_min:.5f}'})")
        if report.passed:
            break
    verdict = None
    if rounds and len(held_out):   # the file written is judged on every verify image, passing round or not
        chosen = report
        log.info("      judging that file on all %d verify images (%d held out of the choice) …", len(verify),
                 len(held_out))
        report = run_gate()
        verdict = held_out_verdict(report, len(verify), held_out)
        log.info("      %s on all %d: flips on the %d held-out images %s at α %s", "passes" if report.passed
                 else "fails", len(verify), len(held_out), "/".join(map(str, verdict["held_out_flips"])),
                 "/".join(f"{a:g}" for a in report.decision.alphas))
        if chosen.passed and not report.passed:
            report.failures.append(f"the {len(layers)} layers the sensitivity pass kept float passed on the "
                                   f"{len(choose)} verify images that chose them, not with the {len(held_out)} held "
                                   "out (more float: --int8-keep-float)")
    if not rounds:
        log.info("      no group fits within a quarter of the CLIP tower's %d linear layers (%d float already)",
                 clip_layers, clip_already)
    # the file written is the last round's (or the first, without rounds): what it keeps float is recorded
    conversion["sensitivity"] = sensitivity.record(groups, kept if rounds else [], rounds, len(images), rank_by,
                                                   static=bool(activation_absmax))
    conversion["sensitivity"]["passed"] = bool(report.passed)
    conversion["sensitivity"]["chosen_on_verify_images"] = len(choose)
    conversion["sensitivity"]["held_out_verdict"] = verdict
    conversion["sensitivity"].update(clip_linear_layers=clip_layers, clip_float_before=clip_already)
    return report, conversion


def measured_verify(verify: np.ndarray, choose: np.ndarray, first_report, rank_by: str) -> np.ndarray:
    """The verify images the groups are measured on: spread over the choosing half, or, ranking by the map, its
    ``VERIFY_IMAGES`` with the lowest map Pearson in the first gate (a map failure is often one image's)."""
    from clipad.calibration.images import evenly_spaced

    pearson = first_report.comparison.map_pearson
    if rank_by != "map" or len(pearson) != len(verify):
        return evenly_spaced(verify[choose], VERIFY_IMAGES)
    worst = np.sort(np.asarray(sorted(choose, key=lambda i: pearson[i])[:VERIFY_IMAGES], dtype=int))
    names = first_report.comparison.names
    log.info("      measured on the verify image(s) with the lowest map Pearson: %s", ", ".join(
        f"{names[i] if i < len(names) else i} ({pearson[i]:.5f})" for i in worst))
    return verify[worst]


def ranking(report) -> str:
    """"map" when the gate failed on the map and its decisions held (what to keep float is then what moves the map),
    else "decision"."""
    from clipad.runtime.compare import decision_failures

    no_map = report.limits.map_pearson_min is not None and report.comparison.map_pearson_min is None
    map_failed = no_map or bool(low_map_images(report))
    return "map" if map_failed and not decision_failures(report.decision, report.limits) else "decision"


def held_out_verdict(final, images: int, held_out: np.ndarray) -> dict:
    """The final gate's verdict on all verify images, with the flips among the held-out ones (counted from the
    flipped images' indices, so a candidate backend need not give an image the same decision in two gates)."""
    held = {int(i) for i in held_out}
    decision = final.decision
    return {"verify_images": images, "held_out_images": len(held), "passed": bool(final.passed),
            "failures": list(final.failures), "map_pearson_min": final.comparison.map_pearson_min,
            "verify_flips": list(decision.verify_flips),
            "held_out_flips": [sum(1 for j in flipped if j in held) for flipped in decision.verify_flipped]}
