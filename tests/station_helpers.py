"""Real components for the station tests, all on loopback ports: a mosquitto broker (persistent, so a restart keeps
the subscriber's session), a QoS-1 subscriber, the MJPEG stream server, a scripted webhook receiver, and edge-detect
itself as a separate process (real signals)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from clipad.benchmarks.peers import Broker, Subscriber, free_port, listening, wait_until  # noqa: F401

EDGE_DETECT = os.path.join(os.path.dirname(sys.executable), "edge-detect")
MJPEG_SERVER = os.path.join(os.path.dirname(__file__), "mjpeg_server.py")


class Mjpeg:
    """The MJPEG test server (64x48 frames every 50 ms) on a fixed port, to kill and restart."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Mjpeg":
        self.proc = subprocess.Popen([sys.executable, MJPEG_SERVER, str(self.port)])
        wait_until(lambda: listening(self.port), 20)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"


class WebhookReceiver:
    """Answers by script (``"500"``, ``"timeout"``, ``"200"``, …; the last entry repeats) and keeps what it accepted."""

    def __init__(self, script: list[str], hang_s: float = 3.0):
        self.script, self.hang_s = list(script), hang_s
        self.accepted: list[dict] = []
        self.requests = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):   # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                answer = receiver.script[min(receiver.requests, len(receiver.script) - 1)]
                receiver.requests += 1
                if answer == "timeout":
                    time.sleep(receiver.hang_s)
                    return
                code = int(answer)
                if code == 200:
                    receiver.accepted.append(json.loads(body))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


class StationProcess:
    """edge-detect in its own process; ``stop()`` sends SIGTERM and returns (exit code, stderr)."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.proc = subprocess.Popen([EDGE_DETECT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.http_port = None
        if "--http" in args:
            self.http_port = int(args[args.index("--http") + 1].rsplit(":", 1)[-1])

    def get(self, path: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(self, path: str, token: str | None = None) -> dict:
        code, body = self.get(path, token)
        assert code == 200, (code, body[:300])
        return json.loads(body)

    def post(self, path: str, data: dict, token: str | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", method="POST",
                                         data=json.dumps(data).encode(), headers={"Content-Type": "application/json"})
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def wait_serving(self, token: str | None = None, seconds: float = 60.0) -> None:
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"edge-detect ended ({self.proc.returncode}): {self.proc.stderr.read()[-2000:]}")
            try:
                return self.get("/healthz", timeout=1)[0] in (200, 503)
            except OSError:
                return False
        wait_until(up, seconds)

    def stop(self, timeout: float = 90) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
