"""edge-doctor: is this box ready to run an export? Checks the install the way it will be used, not the way pip
lists it (a session per ONNX Runtime provider, a real CUDA call, OpenCV's GStreamer), and says how to fix what is not.
Exit 0 when nothing is a problem, 1 when something is, 2 on bad usage. Torch-free."""
from __future__ import annotations

import argparse
import json
import sys

from ..commands import EXIT_OK, run_cli
from ..errors import ClipadError
from .checks import (
    Report,
    check_cameras,
    check_cuda,
    check_onnxruntime,
    check_opencv,
    check_openvino,
    check_platform,
    check_tensorrt,
)

EXIT_PROBLEMS = 1
EPILOG = """\
examples:
  edge-doctor                          # the install: ONNX Runtime, CUDA, TensorRT, OpenVINO, OpenCV
  edge-doctor --model aa_bottle        # + which backend/precision --backend auto picks here, and engines that fit
  edge-doctor --cameras 0-3 --json     # + try camera indices 0..3 (a running station may hold them)

exit status: 0 everything the export needs works, 1 a problem (each printed with its fix), 2 bad usage.
"""


def parse_cameras(text: str) -> list[int]:
    indices: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            first, last = int(low), int(high or low)
            if first < 0 or last < first or last - first > 63:
                raise ValueError
            indices.extend(range(first, last + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: camera indices like 0, 0-3 or 0,2") from None
    return sorted(set(indices))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edge-doctor", description=__doc__.split("Exit 0")[0].strip(), epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", metavar="DIR", help="an export-engine folder: what --backend auto would run here, "
                                                   "which listed engines fit this GPU and TensorRT")
    ap.add_argument("--cameras", type=parse_cameras, metavar="LIST", nargs="?", const=[0, 1, 2, 3],
                    help="try these camera indices (default 0-3); off unless asked, since opening a camera a running "
                         "station holds can disturb it")
    ap.add_argument("--camera-timeout", type=float, default=5.0, metavar="S", help="seconds per camera (default 5)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    return ap


def diagnose(model: str | None = None, cameras: list[int] | None = None, camera_timeout: float = 5.0,
             root: str = "/") -> Report:
    report = Report()
    check_platform(report, root)
    jetson = bool(report.sections["platform"]["jetson"])
    gpu = check_cuda(report)
    check_onnxruntime(report, gpu)
    check_tensorrt(report, jetson)
    check_openvino(report)
    check_opencv(report, jetson)
    if cameras:
        check_cameras(report, cameras, camera_timeout)
    if model:
        from .model import check_model

        check_model(report, model, gpu)
    return report


def _mark(ok: bool | None) -> str:
    return {True: "ok ", False: "NO ", None: " - "}[ok]


def render(report: Report) -> str:
    s, lines = report.sections, []
    plat, py = s["platform"], s["python"]
    jetson = plat["jetson"]
    lines.append(f"platform   {plat['system']} {plat['machine']}, {plat['cpu']['model']} "
                 f"[{' '.join(plat['cpu']['flags']) or 'no listed flags'}]")
    if jetson:
        lines.append(f"jetson     {jetson['model'] or '?'}, L4T {jetson['l4t'] or '?'} "
                     f"(JetPack {jetson['jetpack'] or '?'})")
    lines.append(f"python     {py['version']} ({py['executable']}{', venv' if py['venv'] else ''}"
                 f"{' with system site-packages' if py['venv'] and py['system_site_packages'] else ''}); "
                 f"numpy {s['numpy']['version']}")
    ort = s["onnxruntime"]
    dists = ", ".join(f"{d} {v}" for d, v in ort["distributions"].items()) or "none installed"
    lines.append(f"onnxrt     {dists}")
    for p in ort["providers"]:
        lines.append(f"  {_mark(p['works'])} {p['name']}" + (f": {p['error']}" if p["error"] else ""))
    cuda = s["cuda"]
    access = cuda["access"]
    driver = f"supports CUDA {cuda['driver_cuda_version']}" if cuda["driver_cuda_version"] else "not found"
    lines.append(f"cuda       driver {driver}; access: {access['detail'] or 'none'}")
    for u in access["unusable"]:
        lines.append(f"  {_mark(False)} {u['name']}: {u['why']}")
    gpu = cuda["gpu"]
    lines.append(f"gpu        {gpu['name'] + ' (sm ' + gpu['compute_capability'] + ')' if gpu else 'none'}")
    trt = s["tensorrt"]["modules"]
    lines.append("tensorrt   " + (", ".join(f"{n} {m['version'] or 'broken: ' + m['error']}" for n, m in trt.items())
                                  or "not installed"))
    ov = s["openvino"]
    lines.append("openvino   " + ("not installed" if ov is None else
                                  ov.get("error") or f"{ov['version']} devices {', '.join(ov['devices'])}"))
    cv = s["opencv"]
    if "version" in cv:
        lines.append(f"opencv     {cv['version']} ({', '.join(cv['distributions']) or cv['file']}); GStreamer "
                     f"{'yes' if cv['gstreamer'] else 'no'}, CUDA {'yes' if cv['cuda'] else 'no'}; video I/O: "
                     f"{', '.join(cv['video_backends']) or '?'}")
    else:
        lines.append("opencv     does not import")
    for cam in s.get("cameras") or []:
        detail = f"{cam['frame'][0]}x{cam['frame'][1]}" if cam["frame"] else cam["error"] or "not present"
        lines.append(f"camera {cam['index']:<3} {_mark(bool(cam['frame']))}{detail}")
    model = s.get("model")
    if model:
        lines.append(f"model      {model['dir']}: {model['model']} {model['arch']}@{model['image_size']}")
        auto = model["auto"]
        lines.append(f"  --backend auto → {auto['backend']} {auto['precision']} ({auto['file']}"
                     f"{', ' + auto['providers'][0] if auto.get('providers') else ''}): {auto['why']}")
        for e in model["engines"]:
            lines.append(f"  {_mark(e['fits'])} {e['file']} ({e['precision']}, sm {e['compute_capability']}, "
                         f"{e['flavor']} {e['trt_version']})" + (f": {e['why_not']}" if e["why_not"] else ""))
    for note in report.notes:
        lines.append(f"note: {note}")
    if report.problems:
        lines.append(f"{len(report.problems)} problem(s):")
        for p in report.problems:
            lines.append(f"  - {p['what']}\n    fix: {p['fix']}")
    else:
        lines.append("no problems found")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def action() -> int:
        if args.camera_timeout <= 0:
            raise ClipadError("--camera-timeout must be more than 0 seconds")
        report = diagnose(args.model, args.cameras, args.camera_timeout)
        if args.json:
            print(json.dumps(report.as_dict(), indent=2, default=str))
        else:
            print(render(report))
        return EXIT_PROBLEMS if report.problems else EXIT_OK

    return run_cli("edge-doctor", action, quiet=True)


if __name__ == "__main__":
    sys.exit(main())
