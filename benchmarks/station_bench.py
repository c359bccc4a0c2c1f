"""Measurements of the station against its goals (README "Running a station"), each with real processes:

- ``overhead``: interleaved pairs of runs on one looped video, without and with ``--http`` and one client reading the
  MJPEG stream and polling the status every second; throughput from the JSONL; the median ratio, and the HTTP and
  encoder threads' share of the process's CPU time.
- ``cameras``: three cameras in one process against three single-camera processes on the same box: throughput (all
  frames / wall time) and peak RSS (one process, against the three together).
- ``soak``: a long run with the page open and the MQTT broker killed ``--kills`` times (default 2, 10 s each): RSS
  over time (slope after warm-up), the record → PUBACK latency (with ``--kills 0``: the steady state), and every
  record delivered or counted (subscriber's distinct (camera, seq) + still spooled + dropped = the JSONL's).

``python -m clipad.benchmarks.station_bench overhead --model DIR --video FILE [--pairs 5 --seconds 30] --json F``
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from clipad.runtime.commands import run_cli
from clipad.runtime.errors import ClipadError

from .peers import Broker, Subscriber, free_port, wait_until

EDGE_DETECT = os.path.join(os.path.dirname(sys.executable), "edge-detect")


def rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def records(path: str) -> list[dict]:
    try:
        with open(path) as fh:
            return [json.loads(line) for line in fh]
    except FileNotFoundError:
        return []


def throughput(rows: list[dict]) -> float:
    """Records per second between the first and the last record (the warm-up before the first is left out)."""
    import datetime

    times = sorted(datetime.datetime.fromisoformat(r["time"]).timestamp() for r in rows)
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


def get_json(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return json.loads(response.read())


class Viewer:
    """One client of the live view: reads a camera's MJPEG stream and polls the status once a second."""

    def __init__(self, port: int, camera: str):
        self.port, self.camera, self.stop, self.frames = port, camera, threading.Event(), 0
        self.threads = [threading.Thread(target=self._stream, daemon=True),
                        threading.Thread(target=self._poll, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _stream(self) -> None:
        while not self.stop.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stream/{self.camera}.mjpg",
                                            timeout=10) as response:
                    while not self.stop.is_set():
                        chunk = response.read(65536)
                        if not chunk:
                            break
                        self.frames += chunk.count(b"--frame")
            except OSError:
                time.sleep(0.5)

    def _poll(self) -> None:
        while not self.stop.wait(1.0):
            try:
                get_json(self.port, "/api/status")
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()


def station(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([EDGE_DETECT, *args, "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def overhead(model: str, video: str, pairs: int, seconds: float, tmp: str) -> dict:
    rows = []
    for i in range(pairs):
        pair = {}
        for with_http in (False, True) if i % 2 == 0 else (True, False):   # interleaved, order alternating
            out = os.path.join(tmp, f"o{i}-{int(with_http)}.jsonl")
            port = free_port()
            args = ["--model", model, "--source", f"cam={video}", "--loop", "--jsonl", out]
            proc = station(args + (["--http", str(port)] if with_http else []))
            viewer = share = None
            try:
                if with_http:
                    wait_until(lambda: _serving(port), 60)
                    viewer = Viewer(port, "cam")
                time.sleep(seconds)
                if with_http:
                    live = get_json(port, "/api/status")["live_view"]
                    share = live["cpu_s"] / max(live["process_cpu_s"], 1e-9)
                    pair["view_frames"] = viewer.frames
            finally:
                if viewer is not None:
                    viewer.close()
                stop(proc)
            pair["with_http" if with_http else "without"] = throughput(records(out))
            if share is not None:
                pair["http_cpu_share"] = share
        pair["ratio"] = pair["with_http"] / pair["without"]
        rows.append(pair)
    return {"pairs": rows, "median_ratio": statistics.median(r["ratio"] for r in rows),
            "median_http_cpu_share": statistics.median(r["http_cpu_share"] for r in rows),
            "goal": "throughput with the live view and one client >= 0.95 of without"}


def _serving(port: int) -> bool:
    try:
        return get_json(port, "/api/status") is not None
    except OSError:
        return False


def _peak(procs: list[subprocess.Popen]) -> tuple[float, list[float]]:
    """Wait for the processes, sampling their peak RSS (VmHWM) until each ends; (wall seconds, peaks in MB)."""
    peaks = [0.0] * len(procs)
    started = time.monotonic()
    while any(p.poll() is None for p in procs):
        for i, p in enumerate(procs):
            value = rss_mb(p.pid, "VmHWM")
            if value:
                peaks[i] = max(peaks[i], value)
        time.sleep(0.2)
    return time.monotonic() - started, peaks


def cameras(model: str, video: str, frames: int, tmp: str) -> dict:
    one_out = os.path.join(tmp, "one.jsonl")
    sources = [a for name in ("a", "b", "c") for a in ("--source", f"{name}={video}")]
    one = station(["--model", model, *sources, "--loop", "--max-frames", str(frames), "--jsonl", one_out])
    one_wall, one_peak = _peak([one])
    three_outs = [os.path.join(tmp, f"three-{i}.jsonl") for i in range(3)]
    three = [station(["--model", model, "--source", video, "--loop", "--max-frames", str(frames), "--jsonl", out])
             for out in three_outs]
    three_wall, three_peaks = _peak(three)
    done_one = len(records(one_out))
    done_three = sum(len(records(out)) for out in three_outs)
    return {"frames_per_camera": frames,
            "one_process": {"frames": done_one, "wall_s": round(one_wall, 2),
                            "throughput_fps": round(done_one / one_wall, 3), "peak_rss_mb": round(one_peak[0], 1)},
            "three_processes": {"frames": done_three, "wall_s": round(three_wall, 2),
                                "throughput_fps": round(done_three / three_wall, 3),
                                "peak_rss_mb": [round(p, 1) for p in three_peaks],
                                "peak_rss_mb_total": round(sum(three_peaks), 1)},
            "throughput_ratio": round((done_one / one_wall) / (done_three / three_wall), 3),
            "rss_ratio": round(one_peak[0] / sum(three_peaks), 3),
            "goal": "throughput ratio >= 1 and RSS ratio <= 0.5"}


def soak(model: str, video: str, minutes: float, warmup: float, tmp: str, kills: int = 2) -> dict:
    broker = Broker(Path(tmp) / "broker").start()
    subscriber = Subscriber(broker, "soak/#")
    port = free_port()
    out = os.path.join(tmp, "soak.jsonl")
    proc = station(["--model", model, "--source", f"a={video}", "--source", f"b={video}", "--loop", "--http",
                    str(port), "--mqtt", f"{broker.url}/soak", "--jsonl", out, "--spool-dir",
                    os.path.join(tmp, "spool")])
    viewer = None
    try:
        wait_until(lambda: _serving(port), 60)
        viewer = Viewer(port, "a")
        samples, killed = [], []
        started = time.monotonic()
        end = started + 60 * minutes
        kill_at = [started + 60 * minutes * (i + 1) / (kills + 1) for i in range(kills)]
        while time.monotonic() < end:
            now = time.monotonic()
            if kill_at and now >= kill_at[0]:
                kill_at.pop(0)
                broker.stop()
                killed.append(round((now - started) / 60, 2))
                time.sleep(10)
                broker.start()
            samples.append(((time.monotonic() - started) / 60, rss_mb(proc.pid)))
            time.sleep(5)
        status = get_json(port, "/api/status")
    finally:   # never leave a station running behind a failed measurement
        if viewer is not None:
            viewer.close()
        rc, err = stop(proc)
    written = records(out)
    counts = re.findall(r"mqtt-\w+: \d+ sent, (\d+) still spooled[^,]*, (\d+) dropped", err)
    spooled, dropped = sum(int(s) for s, _ in counts), sum(int(d) for _, d in counts)
    try:
        wait_until(lambda: len({(m["camera"], m["seq"]) for m in subscriber.results()})
                   >= len(written) - spooled - dropped, 120)
    except AssertionError:
        pass   # counted below as unaccounted
    received = {(m["camera"], m["seq"]) for m in subscriber.results()}
    delivered = len(received & {(r["camera"], r["seq"]) for r in written})
    subscriber.close()
    broker.stop()
    import numpy as np

    kept = [(t, r) for t, r in samples if t >= warmup and r is not None]
    slope = float(np.polyfit([t for t, _ in kept], [r for _, r in kept], 1)[0]) if len(kept) > 2 else None
    latency = {name: s.get("record_to_puback_ms") for name, s in status["sinks"].items()}
    return {"minutes": minutes, "warmup_minutes": warmup, "broker_killed_at_minutes": killed, "exit_code": rc,
            "records": len(written), "received_distinct": delivered,
            "still_spooled": spooled, "dropped": dropped,
            "unaccounted": len(written) - delivered - spooled - dropped,
            "rss_mb_first_last": [kept[0][1], kept[-1][1]] if kept else None, "rss_slope_mb_per_min": slope,
            "record_to_puback_ms": latency, "view_frames": viewer.frames, "samples": samples,
            "summary_lines": [line for line in err.splitlines() if "sent" in line]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clipad.benchmarks.station_bench", description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["overhead", "cameras", "soak"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--video", required=True)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--frames", type=int, default=300, help="cameras: frames per camera")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--kills", type=int, default=2, help="soak: how many times the broker is down for 10 s")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)

    def go() -> int:
        from clipad.runtime.atomic import write_json_atomic
        from clipad.runtime.files import probe_file

        probe_file(args.json, "--json")
        if not os.path.isfile(args.video):
            raise ClipadError(f"--video {args.video}: no such file")
        with tempfile.TemporaryDirectory(prefix="clipad-station-bench-") as tmp:
            if args.mode == "overhead":
                result = overhead(args.model, args.video, args.pairs, args.seconds, tmp)
            elif args.mode == "cameras":
                result = cameras(args.model, args.video, args.frames, tmp)
            else:
                result = soak(args.model, args.video, args.minutes, args.warmup, tmp, args.kills)
        result["cpu"] = _cpu()
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
        if args.json:
            write_json_atomic(args.json, result)
        return 0

    return run_cli("station_bench", go, args.quiet)


def _cpu() -> dict:
    from .latency import environment

    env = environment(None)
    return {"cpu": env["cpu"], "flags": env["cpu_flags"], "cores": env["cores"]}


if __name__ == "__main__":
    sys.exit(main())
