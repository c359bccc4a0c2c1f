"""Where records go besides the JSONL: MQTT, a webhook, an evidence folder. Each sink runs on its own thread and
never blocks inspection: ``submit`` writes the record to the sink's spool (bounded, on disk) and returns; the thread
delivers in order and deletes what was acknowledged. An outage means spooling, retrying with back-off and a warning;
a record is either delivered or counted as dropped, never lost silently. Delivery is at least once: consumers dedupe
by (run, camera, seq)."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from urllib.parse import unquote, urlsplit

from .spool import Spool

log = logging.getLogger("clipad")
SENT, RETRY, REJECTED = "sent", "retry", "rejected"


def _ms_since(data: bytes) -> float:
    """Milliseconds from a record's "time" (UTC) to now; NaN when it has none."""
    import datetime

    try:
        when = datetime.datetime.fromisoformat(json.loads(data)["time"])
    except (ValueError, KeyError, TypeError):
        return float("nan")
    return (datetime.datetime.now(datetime.timezone.utc) - when).total_seconds() * 1e3


def wanted(record: dict, on: str) -> bool:
    """``on``: "all", or "ng" (NG parts and records with an error)."""
    return on == "all" or record.get("label") == "NG" or record.get("error") is not None


class Sink:
    """A delivery thread over a spool. Subclasses implement ``deliver(data) -> SENT | RETRY | REJECTED``."""

    kind = "sink"

    def __init__(self, name: str, spool: Spool, on: str):
        self.name, self.spool, self.on = name, spool, on
        self.sent = self.rejected = 0
        self.connected = False
        self.wake = threading.Condition()
        self.stopping = threading.Event()
        self.backoff = 0.5
        self.thread = threading.Thread(target=self._run, name=f"clipad-sink-{name}", daemon=True)

    def start(self) -> "Sink":
        self.thread.start()
        return self

    def submit(self, record: dict) -> None:
        if not wanted(record, self.on):
            return
        self.spool.push(json.dumps(record, allow_nan=False, ensure_ascii=False).encode())
        with self.wake:
            self.wake.notify()

    def _run(self) -> None:
        while not self.stopping.is_set():
            item = self.spool.oldest()
            if item is None:
                with self.wake:
                    self.wake.wait(0.5)
                continue
            seq, data = item
            try:
                result = self.deliver(data)
            except Exception as exc:   # a sink's failure is its own: counted, retried, never inspection's
                log.warning("WARNING: %s sink: %s", self.name, exc)
                result = RETRY
            if result == RETRY:
                with self.wake:   # a reconnect (or a stop) wakes the thread early
                    self.wake.wait(self.backoff)
                self.backoff = min(30.0, self.backoff * 2)
                continue
            self.backoff = 0.5
            self.spool.done(seq)
            if result == SENT:
                self.sent += 1
            else:
                self.rejected += 1

    def deliver(self, data: bytes) -> str:
        raise NotImplementedError

    def status(self) -> dict:
        waiting = len(self.spool)
        queued = min(waiting, self.spool.in_memory())
        return {"kind": self.kind, "sent": self.sent, "queued": queued, "spooled": waiting - queued,
                "dropped": self.spool.dropped + self.rejected, "rejected": self.rejected, "connected": self.connected}

    def drain(self, seconds: float) -> int:
        """Wait up to ``seconds`` for the spool to empty, then stop; returns how many records stay spooled."""
        deadline = time.monotonic() + seconds
        while len(self.spool) and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.05)
        self.stop()
        return len(self.spool)

    def stop(self) -> None:
        self.stopping.set()
        with self.wake:
            self.wake.notify()
        if self.thread.is_alive():
            self.thread.join(timeout=15)


class MqttSink(Sink):
    """One camera's records to ``PREFIX/CAMERA/result`` at QoS 1 (delivered when the broker's PUBACK came back), and
    a retained ``PREFIX/CAMERA/status`` (the last will says offline)."""

    kind = "mqtt"

    def __init__(self, url: str, password: str | None, camera: str, run_id: str, spool: Spool, on: str):
        import paho.mqtt.client as mqtt

        super().__init__(f"mqtt-{camera}", spool, on)
        self.url = url
        parts = urlsplit(url)
        prefix = parts.path.strip("/") or "clipad"
        self.topic, self.status_topic = f"{prefix}/{camera}/result", f"{prefix}/{camera}/status"
        self.ack_ms: list[float] = []            # publish → PUBACK
        self.record_to_ack_ms: list[float] = []  # the record's time → PUBACK (the latency a consumer sees)
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"clipad-{run_id}-{camera}", protocol=mqtt.MQTTv311)
        if parts.username:
            self.client.username_pw_set(unquote(parts.username),
                                        password if password is not None else unquote(parts.password or "") or None)
        self.client.will_set(self.status_topic, json.dumps({"state": "offline", "camera": camera}), qos=1,
                             retain=True)
        self.client.reconnect_delay_set(0.5, 30)
        self.last_status: str | None = None     # set before the network thread can call _on_connect
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.connect_async(parts.hostname, parts.port or 1883, keepalive=10)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        self.connected = not getattr(reason_code, "is_failure", False)
        if self.connected and self.last_status:
            client.publish(self.status_topic, self.last_status, qos=1, retain=True)
        if self.connected:   # what waited for the broker goes out now, not after the back-off
            self.backoff = 0.5
            with self.wake:
                self.wake.notify()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None):
        self.connected = False

    def deliver(self, data: bytes) -> str:
        if not self.connected:
            return RETRY
        started = time.perf_counter()
        info = self.client.publish(self.topic, data, qos=1)
        try:
            info.wait_for_publish(timeout=10.0)   # returns when the broker's PUBACK came back
        except (RuntimeError, ValueError):        # not queued (disconnected meanwhile)
            return RETRY
        if not info.is_published():
            return RETRY    # re-sent later: at least once
        self.ack_ms.append(1e3 * (time.perf_counter() - started))
        self.record_to_ack_ms.append(_ms_since(data))
        del self.ack_ms[:-2000], self.record_to_ack_ms[:-2000]
        return SENT

    def status(self) -> dict:
        import numpy as np

        out = super().status()
        lat = np.asarray(self.record_to_ack_ms, float)
        lat = lat[np.isfinite(lat)]
        out["record_to_puback_ms"] = ({"p50": round(float(np.percentile(lat, 50)), 2),
                                       "p99": round(float(np.percentile(lat, 99)), 2), "n": int(lat.size)}
                                      if lat.size else None)
        return out

    def publish_status(self, status: dict) -> None:
        """The retained status (state online / stalled and counters); kept for the next reconnect too."""
        self.last_status = json.dumps(status, ensure_ascii=False)
        if self.connected:
            self.client.publish(self.status_topic, self.last_status, qos=1, retain=True)

    def stop(self) -> None:
        super().stop()
        try:
            if self.connected:   # a clean stop says offline itself (the will is for crashes)
                info = self.client.publish(self.status_topic, json.dumps(
                    {**json.loads(self.last_status or "{}"), "state": "offline"}), qos=1, retain=True)
                info.wait_for_publish(timeout=2)
            self.client.disconnect()
        finally:
            self.client.loop_stop()


class WebhookSink(Sink):
    """POST each record as JSON; 2xx delivered, 4xx refused (not retried, counted), 5xx and timeouts retried with
    back-off (0.5 s doubling to 30 s)."""

    kind = "webhook"

    def __init__(self, url: str, spool: Spool, on: str, timeout_s: float = 5.0):
        super().__init__("webhook", spool, on)
        self.url, self.timeout_s = url, timeout_s
        self.connected = None   # unknown until the first delivery

    def deliver(self, data: bytes) -> str:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.url, data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read()
            self.connected = True
            return SENT
        except urllib.error.HTTPError as exc:
            self.connected = True
            if 400 <= exc.code < 500:
                log.warning("WARNING: webhook refused a record (HTTP %d); not retried, counted as dropped", exc.code)
                return REJECTED
            return RETRY
        except (OSError, ValueError):   # refused, timeout, DNS: down for now
            self.connected = False
            return RETRY


class EvidenceSink:
    """For each NG part, the input image, overlay, mask and record in DIR/CAMERA/YYYYMMDD/ (``<run>-<seq>.*``),
    written on its own thread from a bounded queue; ``max_bytes`` deletes the oldest evidence files this tool wrote
    (recognised by their folder and name pattern), never any other file."""

    kind = name = "evidence"

    def __init__(self, folder: str, max_bytes: int | None, queue_size: int = 64):
        import queue

        self.folder, self.max_bytes = folder, max_bytes
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.sent = self.dropped = 0
        self.files = self._existing()
        self.bytes = sum(size for _, size in self.files)
        self.thread = threading.Thread(target=self._run, name="clipad-sink-evidence", daemon=True)
        self.stopping = threading.Event()

    def start(self) -> "EvidenceSink":
        self.thread.start()
        return self

    def _existing(self) -> list[tuple[str, int]]:
        import re

        pattern = re.compile(r"^[0-9TZ]+-[0-9a-f]+-\d+(\.mask)?\.(png|jpg|json)$")
        found = []
        for root, _, names in os.walk(self.folder):
            for name in names:
                if pattern.match(name):
                    path = os.path.join(root, name)
                    found.append((os.path.getmtime(path), path, os.path.getsize(path)))
        return [(path, size) for _, path, size in sorted(found)]

    def submit(self, record: dict, image, overlay, mask) -> None:
        import queue

        if record.get("label") != "NG":
            return
        try:
            self.queue.put_nowait((record, image, overlay, mask))
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        import queue

        from ..atomic import write_bytes_atomic
        from ..render import save_image_atomic

        while not (self.stopping.is_set() and self.queue.empty()):
            try:
                record, image, overlay, mask = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            day = record["time"][:10].replace("-", "")
            folder = os.path.join(self.folder, record["camera"], day)
            stem = os.path.join(folder, f"{record['run']}-{record['seq']}")
            try:
                os.makedirs(folder, exist_ok=True)
                written = []
                if image is not None:
                    written.append(save_image_atomic(stem + ".png", image))
                if overlay is not None:
                    written.append(save_image_atomic(stem + ".jpg", overlay))
                if mask is not None:
                    written.append(save_image_atomic(stem + ".mask.png", mask))
                written.append(write_bytes_atomic(stem + ".json", json.dumps(record, ensure_ascii=False).encode()))
            except Exception as exc:   # a full disk: counted, inspection goes on
                self.dropped += 1
                log.warning("WARNING: evidence: %s", exc)
                continue
            self.sent += 1
            for path in written:
                size = os.path.getsize(path)
                self.files.append((path, size))
                self.bytes += size
            self._bound()

    def _bound(self) -> None:
        while self.max_bytes is not None and self.bytes > self.max_bytes and self.files:
            path, size = self.files.pop(0)
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            self.bytes -= size

    def status(self) -> dict:
        return {"kind": self.kind, "sent": self.sent, "queued": self.queue.qsize(), "spooled": 0,
                "dropped": self.dropped, "connected": True}

    def drain(self, seconds: float) -> int:
        deadline = time.monotonic() + seconds
        while not self.queue.empty() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.stopping.set()
        self.thread.join(timeout=15)
        return self.queue.qsize()

    def stop(self) -> None:
        self.drain(0)
