"""The station with real components: edge-detect as its own process, a real mosquitto broker killed and restarted,
a webhook receiver that fails first, the MJPEG stream server killed and restarted, headless Chromium on the page."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import numpy as np
import pytest

from station_helpers import Broker, Mjpeg, StationProcess, Subscriber, WebhookReceiver, free_port, jsonl, wait_until
from tiny_fixtures import export_tiny, write_good_samples, write_video


@pytest.fixture(scope="module")
def model(tiny_files, tmp_path_factory):
    """Tiny zero-shot CLIP (decision score = map maximum), batch 1…4, calibrated on generated good images."""
    from clipad.calibration.cli import main as edge_calibrate

    root = tmp_path_factory.mktemp("station")
    out = root / "clip"
    assert export_tiny(tiny_files, out, "clip", ["--dynamic-batch", "1:4", "--no-engine"]) == 0
    normal = write_good_samples(root / "normal", 12, seed=6)
    assert edge_calibrate(["--model", str(out), "--normal", str(normal), "--target-fpr", "0.3", "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    frames = [np.full((48, 64, 3), 25 * i, np.uint8) for i in range(8)]
    return write_video(tmp_path_factory.mktemp("video") / "line.avi", frames)


def per_camera(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["camera"], []).append(r)
    return out


def test_three_sources_one_process_health_follows_a_stalled_stream(model, video, tmp_path):
    """Two looping videos and one MJPEG stream that is killed and restarted: per-camera records (seq from 1, one run
    id), per-camera overlay folders, /healthz 503 with the stalled camera during the stall and 200 after the
    reconnect, SIGTERM drains and exits 143."""
    stream = Mjpeg().start()
    port = free_port()
    out = tmp_path / "r.jsonl"
    station = StationProcess(["--model", str(model), "--source", f"left={video}", "--source", f"right={video}",
                              "--source", f"belt={stream.url}", "--loop", "--reconnect", "50", "--stall-s", "1.5",
                              "--http", str(port), "--jsonl", str(out), "--save", str(tmp_path / "ov"), "-q"])
    try:
        station.wait_serving()
        wait_until(lambda: all(c["frames"] > 3 for c in station.json("/api/status")["cameras"].values()))
        assert station.get("/healthz")[0] == 200
        stream.kill()
        code, body = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(station.get("/healthz")), 30)
        assert json.loads(body)["stalled"] == ["belt"]
        stream.start()
        wait_until(lambda: station.get("/healthz")[0] == 200, 60)
        frames_after = station.json("/api/status")["cameras"]["belt"]["frames"]
        wait_until(lambda: station.json("/api/status")["cameras"]["belt"]["frames"] > frames_after + 3, 30)
    finally:
        rc, err = station.stop()
        stream.kill()
    assert rc == 143, err
    cameras = per_camera(jsonl(out))
    assert set(cameras) == {"left", "right", "belt"}
    runs = {r["run"] for r in jsonl(out)}
    assert len(runs) == 1
    for name, rows in cameras.items():
        assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1)), name
    gaps = [r for r in cameras["belt"] if r["error"]]
    assert any("reconnect" in r["error"] for r in gaps) and any("reconnected" in r["error"] for r in gaps)
    assert sorted(os.listdir(tmp_path / "ov")) == ["belt", "left", "right"]
    assert all(f.startswith("line_") for f in os.listdir(tmp_path / "ov" / "left"))


def test_mqtt_broker_outage_every_record_arrives_in_order(model, tmp_path):
    """The broker is down for ~10 s mid-run: records spool, go out in order after the reconnect; the subscriber's
    distinct (camera, seq) count equals the JSONL's (nothing was past the spool bound, so nothing dropped); the
    retained status says online, and offline after the clean stop."""
    broker = Broker(tmp_path / "broker").start()
    subscriber = Subscriber(broker, "line/#")
    stream = Mjpeg().start()
    out = tmp_path / "r.jsonl"
    station = StationProcess(["--model", str(model), "--source", f"a={stream.url}", "--source", f"b={stream.url}",
                              "--max-frames", "300", "--mqtt", f"{broker.url}/line", "--jsonl", str(out),
                              "--spool-dir", str(tmp_path / "spool")])
    try:
        wait_until(lambda: len(jsonl(out)) > 40, 60)
        broker.stop()
        down_at = len(jsonl(out))
        time.sleep(10)
        assert len(jsonl(out)) > down_at + 100        # inspection went on while the broker was down
        broker.start()
        rc = station.proc.wait(timeout=120)
        err = station.proc.stderr.read()
    finally:
        station.stop()
        stream.kill()
    assert rc == 0, err
    written = jsonl(out)
    assert len(written) == 600
    wait_until(lambda: len({(m["camera"], m["seq"]) for m in subscriber.results()}) >= 600, 60)
    received = subscriber.results()
    assert {(m["camera"], m["seq"]) for m in received} == {(r["camera"], r["seq"]) for r in written}
    for camera in ("a", "b"):
        firsts = []
        for m in received:
            if m["camera"] == camera and m["seq"] not in firsts:
                firsts.append(m["seq"])
        assert firsts == sorted(firsts), f"{camera}: out of order"
    assert re.search(r"mqtt-a: 300 sent, 0 still spooled, 0 dropped", err), err
    statuses = [(t, p) for t, p, retained in subscriber.messages if t == "line/a/status"]
    assert any(p["state"] == "online" for _, p in statuses) and statuses[-1][1]["state"] == "offline"
    subscriber.close()
    broker.stop()


def test_a_full_spool_drops_the_oldest_and_counts_them(model, video, tmp_path):
    """The broker never comes up and the spool holds ~20 records: the rest are dropped and counted, the JSONL keeps
    every record, and the next run (broker up) delivers what stayed spooled first."""
    broker = Broker(tmp_path / "broker")
    out = tmp_path / "r.jsonl"
    def args(frames: int) -> list[str]:
        return ["--model", str(model), "--source", f"a={video}", "--loop", "--max-frames", str(frames), "--mqtt",
                f"{broker.url}/line", "--jsonl", str(out), "--spool-max-mb", "0.02", "--drain-s", "1"]

    first = StationProcess(args(200))
    rc = first.proc.wait(timeout=120)
    err = first.proc.stderr.read()
    assert rc == 0, err
    found = re.search(r"mqtt-a: 0 sent, (\d+) still spooled \(they go out first on the next run\), (\d+) dropped", err)
    assert found, err
    spooled, dropped = int(found.group(1)), int(found.group(2))
    assert 0 < spooled < 200 and spooled + dropped == 200 and len(jsonl(out)) == 200
    broker.start()
    subscriber = Subscriber(broker, "line/#")
    second = StationProcess(args(2))   # two more frames
    assert second.proc.wait(timeout=120) == 0
    wait_until(lambda: len(subscriber.results()) >= spooled + 2, 30)
    got = subscriber.results()
    first_run = {r["run"] for r in jsonl(out)[:200]}.pop()
    assert [m["run"] for m in got[:spooled]] == [first_run] * spooled          # the leftovers went first
    assert [m["seq"] for m in got[:spooled]] == list(range(201 - spooled, 201))  # the newest were kept
    subscriber.close()
    broker.stop()


def test_webhook_retries_a_500_and_a_timeout_then_delivers_once(model, video, tmp_path):
    receiver = WebhookReceiver(["500", "timeout", "200"], hang_s=2.0)
    out = tmp_path / "r.jsonl"
    station = StationProcess(["--model", str(model), "--source", f"a={video}", "--max-frames", "3", "--threshold",
                              "-1", "--webhook", receiver.url, "--webhook-timeout-s", "1", "--jsonl", str(out)])
    assert station.proc.wait(timeout=120) == 0, station.proc.stderr.read()
    receiver.close()
    assert [r["seq"] for r in receiver.accepted] == [1, 2, 3]       # every NG record once, in order
    assert receiver.requests == 5                                   # 500, timeout, then the three 200s


def test_the_page_in_chromium_shows_the_live_frame_and_the_status(model, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        raise AssertionError("chromium is not installed (scripts/setup_env.sh --test installs it)")
    stream = Mjpeg().start()
    port, token = free_port(), "s3cret-token"
    (tmp_path / "token").write_text(token + "\n")
    station = StationProcess(["--model", str(model), "--source", f"belt={stream.url}", "--reconnect", "100",
                              "--http", str(port), "--http-token-file", str(tmp_path / "token"), "-q"])
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=4000"]
    url = f"http://127.0.0.1:{port}/?token={token}"
    try:
        station.wait_serving()
        wait_until(lambda: station.json("/api/status", token)["cameras"]["belt"]["frames"] > 5)
        shot = tmp_path / "page.png"
        subprocess.run(flags + ["--window-size=1000,800", f"--screenshot={shot}", url], capture_output=True,
                       timeout=120, check=True)
        assert station.json("/api/status", token)["live_view"]["frames_sent"] > 0   # the browser got live frames
        from PIL import Image

        picture = np.asarray(Image.open(shot).convert("RGB"))
        assert picture.shape[:2] == (800, 1000) and picture.std() > 10
        stream.kill()                                         # counters freeze (gaps are rare, back-off doubles)
        wait_until(lambda: station.json("/api/status", token)["cameras"]["belt"]["stalled"], 30)
        for _ in range(3):
            dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
            status = station.json("/api/status", token)["cameras"]["belt"]
            shown = {key: int(re.search(rf'id="{key}-belt">(\d+)<', dom).group(1))
                     for key in ("ok", "ng", "errors", "frames")}
            if shown == {key: status[key] for key in shown}:
                break
        assert shown == {key: status[key] for key in shown}, (shown, status)
    finally:
        station.stop()
        stream.kill()


def test_token_guards_every_endpoint_but_healthz(model, video, tmp_path):
    port = free_port()
    station = StationProcess(["--model", str(model), "--source", f"a={video}", "--loop", "--http", f"127.0.0.1:{port}",
                              "-q"], env={"CLIPAD_HTTP_TOKEN": "right"})
    try:
        station.wait_serving()
        for path in ("/", "/api/status", "/api/records?camera=a&since=0", "/metrics"):
            assert station.get(path)[0] == 401, path
            assert station.get(path, token="wrong")[0] == 401, path
            assert station.get(path, token="right")[0] == 200, path
        assert station.get("/api/status?token=right")[0] == 200
        assert station.get("/healthz")[0] == 200
        assert station.post("/api/cameras/a/class", {"class_name": "screw"})[0] == 401
        # serving starts before the first frame is inferred: wait for frames, then read their metrics
        wait_until(lambda: len(station.json("/api/records?camera=a&since=2", "right")["records"]) > 0)
        metrics = station.get("/metrics", token="right")[1].decode()
        assert 'clipad_frames_total{camera="a"}' in metrics and "clipad_latency_seconds_bucket" in metrics
        records = station.json("/api/records?camera=a&since=2", "right")["records"]
        assert records and all(r["seq"] > 2 for r in records)
        assert station.get("/api/records?camera=nope", token="right")[0] == 404
    finally:
        rc, err = station.stop()
    assert rc == 143 and "right" not in err


def test_changeover_and_a_new_calibration_apply_without_restart(model, tmp_path):
    from clipad.calibration.cli import main as edge_calibrate

    copy = tmp_path / "clip"
    shutil.copytree(model, copy)
    stream = Mjpeg().start()
    port = free_port()
    out = tmp_path / "r.jsonl"
    station = StationProcess(["--model", str(copy), "--source", f"belt={stream.url}", "--http", str(port),
                              "--jsonl", str(out), "-q"])
    try:
        station.wait_serving()
        wait_until(lambda: len(jsonl(out)) > 3)
        assert station.post("/api/cameras/belt/class", {"class_name": "screw"}) == (200, {"camera": "belt",
                                                                                          "class_name": "screw"})
        assert station.post("/api/cameras/belt/class", {"class_name": "nut"})[0] == 400
        assert station.post("/api/cameras/nope/class", {"class_name": "screw"})[0] == 404
        assert station.post("/api/cameras/belt/class", {"wrong": 1})[0] == 400
        wait_until(lambda: jsonl(out)[-1]["class_name"] == "screw")
        before = jsonl(out)[-1]["calibration"]["created"]
        normal = write_good_samples(tmp_path / "normal", 12, seed=9)
        time.sleep(1.1)   # a new creation time (seconds resolution)
        assert edge_calibrate(["--model", str(copy), "--normal", str(normal), "--target-fpr", "0.25", "-q"]) == 0
        wait_until(lambda: jsonl(out)[-1]["calibration"]["target_fpr"] == 0.25, 30)
        assert jsonl(out)[-1]["calibration"]["created"] != before
        text = (copy / "manifest.json").read_text()   # an invalid manifest is not applied: old thresholds stay
        (copy / "manifest.json").write_text(re.sub(r'"image_threshold": [0-9.e+-]+', '"image_threshold": NaN',
                                                   text, count=1))
        wait_until(lambda: any(w["kind"] == "manifest_reload" for w in station.json("/api/status")["warnings"]), 30)
        count = len(jsonl(out))
        wait_until(lambda: len(jsonl(out)) > count + 3)
        assert jsonl(out)[-1]["calibration"]["target_fpr"] == 0.25 and jsonl(out)[-1]["label"] in ("OK", "NG")
    finally:
        station.stop()
        stream.kill()


def test_evidence_keeps_ng_parts_and_its_bound_deletes_only_its_own(model, video, tmp_path):
    evidence = tmp_path / "evidence"
    evidence.mkdir()
    (evidence / "keep-me.txt").write_text("the user's")
    station = StationProcess(["--model", str(model), "--source", f"a={video}", "--loop", "--max-frames", "40",
                              "--threshold", "-1", "--evidence", str(evidence), "--evidence-max-gb", "0.00002"])
    assert station.proc.wait(timeout=120) == 0, station.proc.stderr.read()
    files = [os.path.join(root, f) for root, _, names in os.walk(evidence) for f in names]
    ours = [f for f in files if not f.endswith("keep-me.txt")]
    assert (evidence / "keep-me.txt").read_text() == "the user's"
    assert ours and sum(os.path.getsize(f) for f in ours) <= 20_000
    seqs = {int(re.search(r"-(\d+)\.", os.path.basename(f)).group(1)) for f in ours}
    assert max(seqs) == 40 and min(seqs) > 1                      # the oldest went, the newest stayed
    newest = [f for f in ours if re.search(r"-40\.", os.path.basename(f))]
    assert sorted(os.path.basename(f).split(".", 1)[1] for f in newest) == ["jpg", "json", "mask.png", "png"]


def test_a_broker_that_cannot_listen_fails_with_its_own_log(tmp_path):
    """The test broker's start: a port held by another socket makes mosquitto exit; it is retried, then the failure
    says why (mosquitto's log), instead of "condition not met"."""
    import socket

    broker = Broker(tmp_path / "broker")
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", broker.port))   # bound, not listening: mosquitto's bind fails
    try:
        with pytest.raises(AssertionError, match=f"mosquitto did not listen on 127.0.0.1:{broker.port}; its log "
                                                 "ends: .*Address already in use"):
            broker.start()
        assert broker.proc.poll() is not None
    finally:
        holder.close()
    broker.start()                             # the port is free again: it starts
    broker.stop()
