"""Soak test: ``edge-detect --loop`` on a video for some minutes, sampling its resident memory and the latency of
every frame; reports the slopes after a warm-up (goal: flat, RSS growth below 1 MB/min).

``python -m clipad.benchmarks.soak --model DIR --video FILE [--minutes 5] [--warmup 1] [--json F]``
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from clipad.runtime.commands import run_cli


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def slope_per_minute(t_seconds, values) -> float | None:
    if len(t_seconds) < 3:
        return None
    return float(np.polyfit(np.asarray(t_seconds) / 60.0, np.asarray(values), 1)[0])


def soak(model: str, video: str, minutes: float, warmup: float, extra: list[str]) -> dict:
    exe = os.path.join(os.path.dirname(sys.executable), "edge-detect")
    with tempfile.TemporaryDirectory(prefix="clipad-soak-") as tmp:
        jsonl = os.path.join(tmp, "soak.jsonl")
        proc = subprocess.Popen([exe, "--model", model, "--source", video, "--loop", "--jsonl", jsonl, "-q", *extra])
        start, samples = time.monotonic(), []
        try:
            while time.monotonic() - start < 60 * minutes and proc.poll() is None:
                value = rss_mb(proc.pid)
                if value is not None:
                    samples.append((time.monotonic() - start, value))
                time.sleep(2.0)
        finally:
            proc.terminate()
            proc.wait(60)
        lines = [json.loads(line) for line in open(jsonl)] if os.path.exists(jsonl) else []
    frames = [r for r in lines if r["error"] is None]
    cut = 60 * warmup
    kept = [(t, v) for t, v in samples if t >= cut]
    latency = [sum(r["latency_ms"].values()) for r in frames]
    stamps = [datetime.datetime.fromisoformat(r["time"]).timestamp() for r in frames]
    times = [s - stamps[0] for s in stamps]
    late = [(t, v) for t, v in zip(times, latency) if t >= cut]
    return {"minutes": minutes, "warmup_minutes": warmup, "frames": len(frames), "errors": len(lines) - len(frames),
            "rss_mb_start": kept[0][1] if kept else None, "rss_mb_end": kept[-1][1] if kept else None,
            "rss_slope_mb_per_min": slope_per_minute(*zip(*kept)) if len(kept) >= 3 else None,
            "latency_ms_p50": float(np.median(latency)) if latency else None,
            "latency_slope_ms_per_min": slope_per_minute(*zip(*late)) if len(late) >= 3 else None,
            "exit_code": proc.returncode}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clipad.benchmarks.soak", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--video", required=True)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0, help="minutes left out of the slopes (default 1)")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    args, extra = ap.parse_known_args(argv)

    def go() -> int:
        from clipad.runtime.files import probe_file, refuse_reports_over

        refuse_reports_over({"--json": args.json}, args.model, [args.video])
        probe_file(args.json, "--json")
        result = soak(args.model, args.video, args.minutes, args.warmup, extra)
        print(json.dumps(result, indent=2))
        if args.json:
            from clipad.runtime.atomic import write_json_atomic

            write_json_atomic(args.json, result)
        return 0

    return run_cli("soak", go, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
