"""Real peers for the station's tests and measurements, on loopback ports: a mosquitto broker (persistent, so a
restart keeps a subscriber's session) and a QoS-1 subscriber."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def wait_until(condition, seconds: float = 60.0, every: float = 0.1):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {seconds} s")


class Broker:
    """mosquitto on a loopback port; ``stop`` (SIGTERM: it saves its database) and ``start`` again keep sessions."""

    def __init__(self, folder: Path):
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(binary):
            raise AssertionError("mosquitto is not installed (apt-get install mosquitto; scripts/setup_env.sh --test "
                                 "does)")
        self.binary, self.folder, self.port = binary, folder, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                             f"persistence_location {folder}/\nautosave_interval 1\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Broker":
        """Start mosquitto; a start that exits (e.g. the port briefly held by another socket) is retried twice, and
        a broker that never listens fails with the end of mosquitto's own log."""
        log = self.folder / "mosquitto.log"
        for _ in range(3):
            with open(log, "ab") as out:
                self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.proc.poll() is None:
                if listening(self.port):
                    return self
                time.sleep(0.1)
            if self.proc.poll() is None:
                break
            time.sleep(1)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=20)
        raise AssertionError(f"mosquitto did not listen on 127.0.0.1:{self.port}; its log ends: "
                             f"{log.read_text(errors='replace')[-400:]!r}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)
        wait_until(lambda: not listening(self.port), 20)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


class Subscriber:
    """A persistent-session QoS-1 subscriber that reconnects by itself; ``messages``: (topic, payload dict)."""

    def __init__(self, broker: Broker, topic: str):
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, dict, bool]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"test-subscriber-{broker.port}", clean_session=False,
                                  protocol=mqtt.MQTTv311)
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, codes, p=None: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect("127.0.0.1", broker.port, keepalive=5)
        self.client.loop_start()
        if not self.subscribed.wait(20):
            raise AssertionError("the test subscriber could not subscribe")

    def _on_message(self, client, userdata, message):
        with self.lock:
            self.messages.append((message.topic, json.loads(message.payload), bool(message.retain)))

    def results(self) -> list[dict]:
        with self.lock:
            return [payload for topic, payload, _ in self.messages if topic.endswith("/result")]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
