"""A station around ``edge-detect``'s staged run: per-camera state, sinks (MQTT, webhook, evidence), the live view,
metrics, the watchdog, changeovers and manifest reloads. ``Station.open`` checks and binds everything that can fail
as a usage error before any camera opens; ``after(record, …)`` is called on the post-processing thread for every
record; ``close(drain_s)`` drains the sinks and says what is left."""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time

import numpy as np

from ..errors import ClipadError
from .config import OutputsConfig, StationConfig, redact
from .state import CameraState, StationState, new_run_id

log = logging.getLogger("clipad")
RELOAD_EVERY_S = 2.0
STATUS_EVERY_S = 5.0


def default_spool_dir(jsonl: str | None) -> str:
    if jsonl:
        return os.path.abspath(jsonl) + ".spool"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "clipad", "spool")


class Station:
    def __init__(self, config: StationConfig, detector, model_dir: str | None):
        self.config, self.detector, self.model_dir = config, detector, model_dir
        self.run_id = new_run_id()
        cameras = {c.name: CameraState(c.name, redact(str(c.source)), detector.class_names[
            detector.class_index(c.class_name)]) for c in config.cameras}
        m = detector.manifest.model
        model = {"kind": m.kind, "arch": m.arch, "class_names": list(detector.class_names),
                 "backend": detector.backend.description, "precision": detector.backend.precision,
                 "model": model_dir, "decision_score": detector.policy.rule}
        self.state = StationState(self.run_id, cameras, model, config.http.stall_s)
        self.state.policy = detector.policy
        self.stopping = threading.Event()
        self.reloads = False              # thresholds follow manifest changes (live sources)
        self.server = self.metrics = None
        self.mqtt: dict[str, object] = {}
        self.webhook = self.evidence = None
        self.threads: list[threading.Thread] = []
        self._manifest_seen = self._manifest_stamp()
        self._model_sha = self._running_sha()

    # ---- opening ---------------------------------------------------------------------------------------------------
    def open_outputs(self) -> None:
        """Bind the HTTP port and start the sinks; every failure here is a usage error before any camera opens. A
        broker or webhook that is down is not one: its sink spools and says so."""
        o, h = self.config.outputs, self.config.http
        if h.port is not None:
            from .http import StationServer
            from .metrics import StationMetrics

            self.metrics = StationMetrics(self.state)
            self.server = StationServer(self.state, h.host, h.port, h.token, h.fps, self.change_class, self.metrics)
        spool_root = o.spool_dir or default_spool_dir(o.jsonl)
        max_bytes = int(o.spool_max_mb * 1e6)
        if o.mqtt:
            from .sinks import MqttSink
            from .spool import Spool

            _need("paho.mqtt", "--mqtt")
            for name in self.state.cameras:
                self.mqtt[name] = MqttSink(o.mqtt, o.mqtt_password, name, self.run_id,
                                           Spool(os.path.join(spool_root, _sink_folder("mqtt", o.mqtt, name)),
                                                 max_bytes), o.mqtt_on).start()
        if o.webhook:
            from .sinks import WebhookSink
            from .spool import Spool

            self.webhook = WebhookSink(o.webhook, Spool(os.path.join(spool_root, _sink_folder("webhook", o.webhook)),
                                                        max_bytes), o.webhook_on, o.webhook_timeout_s).start()
        if o.evidence:
            from ..files import probe_folder
            from .sinks import EvidenceSink

            probe_folder(o.evidence, "--evidence")
            limit = None if o.evidence_max_gb is None else int(o.evidence_max_gb * 1e9)
            self.evidence = EvidenceSink(o.evidence, limit).start()
        self.state.sinks = [*self.mqtt.values(), *([self.webhook] if self.webhook else []),
                            *([self.evidence] if self.evidence else [])]
        for sink in self.state.sinks:
            carried = getattr(getattr(sink, "spool", None), "carried_over", 0)
            if carried:
                log.info("%s: %d record(s) left by an earlier run go out first", sink.name, carried)
        if self.server is not None:
            self.server.start()
            log.info("live view: http://%s:%d/%s", self.config.http.host, self.server.port,
                     "?token=…" if self.config.http.token else "")
        self._start(self._housekeeping, "clipad-station-housekeeping")

    def _start(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    # ---- per record (post-processing thread) --------------------------------------------------------------------
    def wants_overlay(self, camera: str, record_is_ng: bool) -> bool:
        view = self.server.live.wants(camera) if self.server else False
        return view or (record_is_ng and (self.server is not None or self.evidence is not None))

    def after(self, record: dict, frame_bgr, overlay, mask) -> None:
        camera = self.state.cameras[record["camera"]]
        with self.state.lock:
            camera.count(record)
        camera.watch.frame(frame_bgr)
        if self.metrics is not None:
            self.metrics.observe(camera.name, record["latency_ms"])
        if overlay is not None and self.server is not None:
            camera.overlay, camera.overlay_id = overlay, camera.overlay_id + 1
            if record.get("label") == "NG":
                self._thumbnail(camera, record, overlay)
        sink = self.mqtt.get(camera.name)
        if sink is not None:
            sink.submit(record)
        if self.webhook is not None:
            self.webhook.submit(record)
        if self.evidence is not None:
            self.evidence.submit(record, frame_bgr, overlay, mask)

    def _thumbnail(self, camera: CameraState, record: dict, overlay: np.ndarray) -> None:
        import cv2

        height, width = overlay.shape[:2]
        small = cv2.resize(overlay, (200, max(1, round(200 * height / width))), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 80])
        if ok:
            camera.thumbnails.append({"seq": record["seq"], "time": record["time"], "score": record["score"],
                                      "decision_score": record["decision_score"],
                                      "regions": len(record["regions"] or []), "jpeg": buf.tobytes()})

    def class_of(self, camera: str) -> str:
        return self.state.cameras[camera].class_name

    def change_class(self, camera: str, class_name: str) -> None:
        """A changeover: the camera reports ``class_name`` (one of the export's baked classes) from its next frame."""
        if class_name not in self.detector.class_names:
            raise ClipadError(f"unknown class {class_name!r}; this export has {', '.join(self.detector.class_names)}")
        self.state.cameras[camera].class_name = class_name
        log.info("camera %s now reports class %r", camera, class_name)

    # ---- housekeeping: manifest reloads and MQTT status -------------------------------------------------------------
    def _housekeeping(self) -> None:
        last_status = 0.0
        states: dict[str, str] = {}
        started = time.monotonic()
        said: set[str] = set()
        while not self.stopping.wait(RELOAD_EVERY_S / 2):
            for sink in self.state.sinks:   # a destination that is down is said once, not a usage error
                if sink.status()["connected"] is False and sink.name not in said and time.monotonic() - started > 5:
                    said.add(sink.name)
                    log.warning("WARNING: %s is not reachable (%s); records wait in its spool and go out when it "
                                "is back", sink.name, redact(getattr(sink, "url", "") or sink.kind))
            try:
                if self.reloads:
                    self._reload_if_changed()
            except Exception as exc:   # a reload never stops inspection
                self.state.notes["manifest_reload"] = f"reload failed ({exc}); the previous thresholds stay"
            if self.mqtt:
                now = time.monotonic()
                current = {name: ("stalled" if c.stalled(self.config.http.stall_s) else "online")
                           for name, c in self.state.cameras.items()}
                if now - last_status >= STATUS_EVERY_S or current != states:
                    last_status, states = now, current
                    self.publish_status(current)

    def publish_status(self, states: dict[str, str]) -> None:
        status = self.state.status()
        for name, sink in self.mqtt.items():
            camera = status["cameras"][name]
            sink.publish_status({"state": states[name], "camera": name, "run": self.run_id,
                                 **{k: camera[k] for k in ("frames", "ok", "ng", "errors", "fps", "class_name",
                                                           "last_frame_age_s")},
                                 "warnings": [w for w in status["warnings"] if w["camera"] in (name, None)]})

    def _manifest_stamp(self):
        if not self.model_dir:
            return None
        try:
            st = os.stat(os.path.join(self.model_dir, "manifest.json"))
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _running_sha(self) -> str | None:
        path = getattr(self.detector.backend, "path", None)
        if path is None:
            return None
        for name, entry in self.detector.manifest.files.items():
            if os.path.basename(path) == name:
                return entry.sha256
        return None

    def _reload_if_changed(self) -> None:
        """A new manifest (a new edge-calibrate on the box) replaces the thresholds within seconds, read under the
        manifest's lock; an invalid one, or one that no longer lists the running model file, is not applied."""
        stamp = self._manifest_stamp()
        if stamp is None or stamp == self._manifest_seen:
            return
        self._manifest_seen = stamp
        from ..detector import decision_setup
        from ..manifest import Manifest, lock

        try:
            with lock(self.model_dir, timeout=10, shared=True):
                manifest = Manifest.read(self.model_dir)
        except ClipadError as exc:
            self.state.notes["manifest_reload"] = f"not applied: {exc}; the previous thresholds stay"
            log.warning("WARNING: manifest changed but %s", self.state.notes["manifest_reload"])
            return
        path = getattr(self.detector.backend, "path", None)
        if self._model_sha is not None and path is not None:
            entry = manifest.files.get(os.path.basename(path))
            if entry is None or entry.sha256 != self._model_sha:
                self.state.notes["manifest_reload"] = ("not applied: the new manifest lists another model file than "
                                                       "the one running (re-exported?); restart to use it")
                log.warning("WARNING: manifest changed but %s", self.state.notes["manifest_reload"])
                return
        try:   # thresholds fitted with a few-shot memory come with it (edge-calibrate --memory on the box)
            policy, fewshot = decision_setup(self.model_dir, manifest, self.detector.backend)
        except ClipadError as exc:
            self.state.notes["manifest_reload"] = f"not applied: {exc}; the previous thresholds stay"
            log.warning("WARNING: manifest changed but %s", self.state.notes["manifest_reload"])
            return
        policy.take_warning()
        self.detector.manifest = manifest
        self.detector.swap(policy, fewshot)   # thresholds and memory together, in one assignment
        self.state.policy = policy
        self.state.notes.pop("manifest_reload", None)
        log.info("manifest changed: thresholds reloaded (%s)", ", ".join(
            f"{name}: {policy.describe(c.class_name)}" for name, c in self.state.cameras.items()))

    # ---- closing ----------------------------------------------------------------------------------------------------
    def camera_lost(self, camera: str, why: str) -> None:
        self.state.cameras[camera].lost = why
        log.warning("WARNING: camera %s: %s; the other cameras go on", camera, why)

    def close(self, drain_s: float) -> list[str]:
        """Drain the sinks (up to ``drain_s`` in all), stop everything; one summary line per sink that kept records."""
        self.stopping.set()
        deadline = time.monotonic() + drain_s
        if self.mqtt:
            self.publish_status({name: "offline" for name in self.state.cameras})
        lines = []
        for sink in self.state.sinks:
            left = sink.drain(max(0.0, deadline - time.monotonic()))
            status = sink.status()
            lines.append(f"{sink.name}: {status['sent']} sent, {left} still spooled"
                         + (" (they go out first on the next run)" if left else "") + f", {status['dropped']} dropped")
        if self.server is not None:
            self.server.stop()
        for thread in self.threads:
            thread.join(timeout=5)
        return lines


def _sink_folder(kind: str, url: str, camera: str | None = None) -> str:
    """A spool folder per sink destination (and camera), stable across runs so leftovers go out next time."""
    digest = hashlib.sha256(redact(url).encode()).hexdigest()[:10]
    return f"{kind}-{digest}" + (f"-{camera}" if camera else "")


def _need(module: str, flag: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        raise ClipadError(f"{flag} needs the station extra: pip install 'clipad-edge[station]'") from None


def outputs_config(**values) -> OutputsConfig:
    return OutputsConfig(**{k: v for k, v in values.items() if v is not None})
