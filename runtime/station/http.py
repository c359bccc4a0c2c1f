"""The live view: one self-contained page, MJPEG streams of the overlays, the status and recent records as JSON,
Prometheus metrics, a health check and the class changeover, on the standard library's threading HTTP server.

Inspection never waits for a viewer: overlays for the view are drawn on the post-processing thread at most
``--http-fps`` times a second per camera and only while someone watches; JPEG encoding runs on the encoder thread;
each client writes on its own thread and always gets the newest frame, so a slow client drops frames. With a token,
every endpoint but ``/healthz`` needs it (``Authorization: Bearer …`` or ``?token=…``), compared in constant time."""
from __future__ import annotations

import hmac
import json
import os
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from ..errors import ClipadError

log = logging.getLogger("clipad")


class LiveView:
    """Newest JPEG per camera, made at most ``fps`` times a second while a client watches that camera."""

    def __init__(self, state, fps: float):
        self.state, self.period = state, 1.0 / max(fps, 0.1)
        self.watchers = {name: 0 for name in state.cameras}
        self.rendered = {name: 0.0 for name in state.cameras}
        self.jpeg: dict[str, tuple[int, bytes]] = {}
        self.frames_sent = 0                  # JPEGs written to clients (all cameras)
        self.cpu_s = 0.0                      # CPU time of the encoder and the HTTP threads (thread_time)
        self.changed = threading.Condition()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._encode, name="clipad-live-encoder", daemon=True)

    def wants(self, camera: str) -> bool:
        """Whether the post stage should draw this camera's overlay for the view now."""
        now = time.monotonic()
        if self.watchers.get(camera, 0) <= 0 or now - self.rendered[camera] < self.period:
            return False
        self.rendered[camera] = now
        return True

    def _encode(self) -> None:
        import cv2

        done: dict[str, int] = {}
        while not self.stopping.wait(self.period / 2):
            started = time.thread_time()
            for name, camera in self.state.cameras.items():
                overlay, ident = camera.overlay, camera.overlay_id
                if overlay is None or done.get(name) == ident or self.watchers.get(name, 0) <= 0:
                    continue
                ok, buf = cv2.imencode(".jpg", overlay, [cv2.IMWRITE_JPEG_QUALITY, 80])
                if ok:
                    done[name] = ident
                    with self.changed:
                        self.jpeg[name] = (ident, buf.tobytes())
                        self.changed.notify_all()
            self.cpu_s += time.thread_time() - started

    def next_jpeg(self, camera: str, after: int, timeout: float = 1.0) -> tuple[int, bytes] | None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not self.stopping.is_set():
                current = self.jpeg.get(camera)
                if current is not None and current[0] != after:
                    return current
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.changed.wait(left)
        return None


class StationServer:
    def __init__(self, state, host: str, port: int, token: str | None, fps: float, change_class, metrics):
        self.state, self.token, self.change_class, self.metrics = state, token, change_class, metrics
        self.live = LiveView(state, fps)
        handler = type("Handler", (_Handler,), {"station": self})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ClipadError(f"--http {host}:{port}: cannot listen there ({exc.strerror or exc})") from None
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="clipad-http", daemon=True)
        if token is None and host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("WARNING: --http %s:%d listens beyond this machine without --http-token: anyone on the "
                        "network can watch and change classes", host, port)

    def start(self) -> "StationServer":
        self.live.thread.start()
        self.thread.start()
        return self

    def stop(self) -> None:
        self.live.stopping.set()
        with self.live.changed:
            self.live.changed.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    def authorized(self, header: str | None, query: dict) -> bool:
        if self.token is None:
            return True
        given = ""
        if header and header.startswith("Bearer "):
            given = header[len("Bearer "):].strip()
        elif query.get("token"):
            given = query["token"][0]
        return hmac.compare_digest(given.encode(), self.token.encode())


class _Handler(BaseHTTPRequestHandler):
    station: StationServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):   # the access log stays out of the station's output (and of tokens)
        pass

    def _send(self, code: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, data) -> None:
        self._send(code, json.dumps(data, allow_nan=False, ensure_ascii=False).encode(), "application/json")

    def _route(self) -> tuple[str, dict] | None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        if parts.path == "/healthz":
            code, body = self.station.state.health()
            self._json(code, body)
            return None
        if not self.station.authorized(self.headers.get("Authorization"), query):
            self._json(401, {"error": "a valid token is required (Authorization: Bearer … or ?token=…)"})
            return None
        return parts.path, query

    def do_GET(self):   # noqa: N802 (the standard library's name)
        self._cpu_mark = time.thread_time()
        try:
            self._get()
        finally:
            self._count_cpu()

    def _count_cpu(self) -> None:
        now = time.thread_time()
        self.station.live.cpu_s += now - self._cpu_mark
        self._cpu_mark = now

    def _get(self) -> None:
        routed = self._route()
        if routed is None:
            return
        path, query = routed
        state = self.station.state
        try:
            if path in ("/", "/index.html"):
                from .page import PAGE

                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            elif path == "/api/status":
                status = state.status()
                live = self.station.live
                status["live_view"] = {"clients": sum(live.watchers.values()), "frames_sent": live.frames_sent,
                                       "fps": round(1 / live.period, 3), "cpu_s": round(live.cpu_s, 3),
                                       "process_cpu_s": round(sum(os.times()[:2]), 3)}
                self._json(200, status)
            elif path == "/api/records":
                camera = (query.get("camera") or [""])[0]
                if camera not in state.cameras:
                    return self._json(404, {"error": f"unknown camera {camera!r}"})
                since = int((query.get("since") or ["0"])[0])
                self._json(200, {"camera": camera, "records": state.records_since(camera, since)})
            elif path == "/metrics":
                body, content_type = self.station.metrics.exposition()
                self._send(200, body, content_type)
            elif path.startswith("/stream/") and path.endswith(".mjpg"):
                self._stream(path[len("/stream/"):-len(".mjpg")])
            elif path.startswith("/api/thumb/"):
                self._thumbnail(path[len("/api/thumb/"):])
            else:
                self._json(404, {"error": f"no such page {path}"})
        except ValueError as exc:
            self._json(400, {"error": str(exc)})
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self):   # noqa: N802
        routed = self._route()
        if routed is None:
            return
        path, _ = routed
        parts = path.strip("/").split("/")
        if len(parts) != 4 or parts[:2] != ["api", "cameras"] or parts[3] != "class":
            return self._json(404, {"error": f"no such endpoint {path}"})
        camera = parts[2]
        if camera not in self.station.state.cameras:
            return self._json(404, {"error": f"unknown camera {camera!r}"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(min(length, 65536)) or b"{}")
            name = body["class_name"]
        except (ValueError, KeyError, TypeError):
            return self._json(400, {"error": 'expected JSON {"class_name": "…"}'})
        try:
            self.station.change_class(camera, name)
        except ClipadError as exc:
            return self._json(400, {"error": str(exc)})
        self._json(200, {"camera": camera, "class_name": name})

    def _stream(self, camera: str) -> None:
        live = self.station.live
        if camera not in self.station.state.cameras:
            return self._json(404, {"error": f"unknown camera {camera!r}"})
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        live.watchers[camera] = live.watchers.get(camera, 0) + 1
        last, jpeg = -1, None
        try:
            while not live.stopping.is_set():
                item = live.next_jpeg(camera, last)
                if item is not None:
                    last, jpeg = item
                elif jpeg is None:
                    continue
                # else: no new frame for a second (a stalled camera): the last one again, as a keep-alive
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                 + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg + b"\r\n")
                self.wfile.flush()
                live.frames_sent += 1
                self._count_cpu()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        finally:
            live.watchers[camera] -= 1
            self.close_connection = True

    def _thumbnail(self, rest: str) -> None:
        camera, _, name = rest.partition("/")
        state = self.station.state
        if camera not in state.cameras or not name.endswith(".jpg"):
            return self._json(404, {"error": "no such thumbnail"})
        seq = int(name[:-4])
        for thumb in list(state.cameras[camera].thumbnails):
            if thumb["seq"] == seq:
                return self._send(200, thumb["jpeg"], "image/jpeg")
        self._json(404, {"error": "no such thumbnail (only the last NG parts are kept)"})
