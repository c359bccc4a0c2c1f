"""What a running station knows, per camera and overall: counters since start, the recent records (a bounded ring),
the last NG parts, the newest overlay for the live view, the watchdog, the sinks; ``status()`` and ``health()`` are
what the HTTP API, the MQTT status topics and the metrics report."""
from __future__ import annotations

import datetime
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .watchdog import CameraWatch

RECORDS_KEPT = 500     # per camera, for /api/records
THUMBNAILS_KEPT = 8    # last NG parts per camera on the page


def new_run_id() -> str:
    """This process's run: UTC start time and a random suffix (consumers dedupe by run, camera, seq)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


@dataclass
class CameraState:
    name: str
    source: str
    class_name: str
    frames: int = 0
    ok: int = 0
    ng: int = 0
    errors: int = 0
    seq: int = 0
    arrivals: deque = field(default_factory=lambda: deque(maxlen=1000))   # monotonic times of recent frames
    last_frame: float | None = None        # monotonic time of the last frame that arrived
    started: float = field(default_factory=time.monotonic)
    latencies: deque = field(default_factory=lambda: deque(maxlen=500))
    records: deque = field(default_factory=lambda: deque(maxlen=RECORDS_KEPT))
    thumbnails: deque = field(default_factory=lambda: deque(maxlen=THUMBNAILS_KEPT))
    overlay: np.ndarray | None = None      # newest overlay (BGR) for the live view
    overlay_id: int = 0
    watch: CameraWatch = field(default_factory=CameraWatch)
    lost: str | None = None                # why the source ended, when it did

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    @property
    def fps(self) -> float:
        """Frames per second over the last 5 s (0 with fewer than two)."""
        now = time.monotonic()
        recent = [t for t in self.arrivals if now - t <= 5.0]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)

    def count(self, record: dict) -> None:
        now = time.monotonic()
        self.arrivals.append(now)
        self.last_frame = now
        self.frames += 1
        if record.get("error") is not None:
            self.errors += 1
        if record.get("label") == "NG":
            self.ng += 1
        elif record.get("label") == "OK":
            self.ok += 1
        latency = record.get("latency_ms") or {}
        if latency.get("infer") is not None:
            self.latencies.append(sum(v for v in latency.values() if v is not None))
        self.records.append(record)
        self.watch.decision(record.get("label"), record.get("p_value"))

    def summary(self, alpha: float | None, stall_s: float) -> dict:
        lat = np.asarray(self.latencies, float)
        age = None if self.last_frame is None else time.monotonic() - self.last_frame
        return {"frames": self.frames, "ok": self.ok, "ng": self.ng, "errors": self.errors,
                "ng_rate": self.ng / max(1, self.ok + self.ng), "target_fpr": alpha,
                "fps": round(self.fps, 3), "class_name": self.class_name, "source": self.source,
                "last_frame_age_s": None if age is None else round(age, 3),
                "stalled": self.stalled(stall_s), "lost": self.lost,
                "latency_ms": {"p50": float(np.percentile(lat, 50)) if lat.size else None,
                               "p99": float(np.percentile(lat, 99)) if lat.size else None},
                "last_ng": [{k: v for k, v in t.items() if k != "jpeg"} for t in self.thumbnails]}

    def stalled(self, stall_s: float) -> bool:
        last = self.last_frame if self.last_frame is not None else self.started
        return time.monotonic() - last > stall_s


class StationState:
    def __init__(self, run_id: str, cameras: dict[str, CameraState], model: dict, stall_s: float):
        self.run_id, self.cameras, self.model, self.stall_s = run_id, cameras, model, stall_s
        self.sinks: list = []
        self.lock = threading.Lock()
        self.notes: dict[str, str] = {}   # station-level warnings by key (manifest reload, spool drops, …)
        self.policy = None                # the DecisionPolicy in use (swapped on a manifest reload)

    def alpha(self, camera: str) -> float | None:
        cal = self.policy.class_calibration(self.cameras[camera].class_name) if self.policy else None
        return cal.target_fpr if cal else None

    def warnings(self) -> list[dict]:
        out = [{"camera": None, "kind": key, "detail": text} for key, text in self.notes.items()]
        for name, camera in self.cameras.items():
            if camera.stalled(self.stall_s):
                out.append({"camera": name, "kind": "stalled",
                            "detail": f"no frame for more than {self.stall_s:g} s"})
            out += camera.watch.warnings(name, self.alpha(name))
        for sink in self.sinks:
            s = sink.status()
            if s["connected"] is False or s["dropped"]:
                out.append({"camera": None, "kind": f"sink_{sink.name}",
                            "detail": ("disconnected" if s["connected"] is False else "connected")
                            + f", {s['queued'] + s['spooled']} waiting, {s['dropped']} dropped"})
        return out

    def status(self) -> dict:
        with self.lock:
            cameras = {name: c.summary(self.alpha(name), self.stall_s) for name, c in self.cameras.items()}
        return {"run": self.run_id, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="milliseconds"), "cameras": cameras, "sinks": {s.name: s.status() for s in self.sinks},
                "model": self.model, "warnings": self.warnings()}

    def health(self) -> tuple[int, dict]:
        """200 while every camera delivered a frame within the stall time (sinks may be degraded), else 503."""
        stalled = [name for name, c in self.cameras.items() if c.stalled(self.stall_s)]
        degraded = [s.name for s in self.sinks if s.status()["connected"] is False]
        body = {"ok": not stalled, "stalled": stalled, "sinks_degraded": degraded}
        return (503 if stalled else 200), body

    def records_since(self, camera: str, since: int) -> list[dict]:
        with self.lock:
            return [r for r in self.cameras[camera].records if r["seq"] > since]
