"""The station's pieces without real peers: camera names and station files (one-line usage errors that say which
line), usage errors before anything runs, cross-camera batching, the spool, the watchdog."""
from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest

from clipad.runtime.detect.cli import main as edge_detect
from clipad.runtime.errors import ClipadError
from clipad.runtime.station.config import cameras_from_flags, split_named, station_from_file
from clipad.runtime.station.spool import Spool
from clipad.runtime.station.watchdog import CameraWatch
from tiny_fixtures import export_tiny, write_video


@pytest.fixture(scope="module")
def model(tiny_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("st") / "clip"
    assert export_tiny(tiny_files, out, "clip", ["--dynamic-batch", "1:4", "--no-engine"]) == 0
    return out


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("v") / "v.avi", [np.full((40, 48, 3), 30 * i, np.uint8)
                                                                for i in range(6)])


def test_names_on_the_command_line(tmp_path):
    (tmp_path / "a=b.png").write_bytes(b"x")
    assert split_named("line1=rtsp://cam/x") == ("line1", "rtsp://cam/x")
    assert split_named("rtsp://cam/x?a=b") == (None, "rtsp://cam/x?a=b")
    assert split_named(str(tmp_path / "a=b.png")) == (None, str(tmp_path / "a=b.png"))   # an existing path
    assert split_named("gst:videotestsrc num-buffers=5 ! appsink") == (None, "gst:videotestsrc num-buffers=5 ! "
                                                                             "appsink")
    assert split_named("top=0") == ("top", "0")
    cams = cameras_from_flags(["top=0"], ["a.mp4", "side=b.mp4"], "bottle", 2)
    assert [(c.name, c.source, c.class_name, c.reconnect) for c in cams] == [
        ("top", 0, "bottle", 2), ("cam1", "a.mp4", "bottle", 2), ("side", "b.mp4", "bottle", 2)]
    with pytest.raises(ClipadError, match="two cameras are named 'a'"):
        cameras_from_flags(None, ["a=x.mp4", "a=y.mp4"], None, 0)
    with pytest.raises(ClipadError, match="a camera index"):
        cameras_from_flags(["front"], None, None, 0)


STATION = """\
# a station file
[[camera]]
name = "left"
source = "{video}"
class = "screw"

[[camera]]
name = "right"
camera = 0
reconnect = 3

[outputs]
jsonl = "results.jsonl"
mqtt = "mqtt://broker/line3"

[http]
listen = "0.0.0.0:8080"
fps = 2
"""


def test_station_file_reads(tmp_path, video):
    path = tmp_path / "station.toml"
    path.write_text(STATION.format(video=video))
    cameras, outputs, http = station_from_file(str(path), None)
    assert [(c.name, c.source, c.class_name, c.reconnect) for c in cameras] == [
        ("left", str(video), "screw", 0), ("right", 0, None, 3)]
    assert outputs == {"jsonl": "results.jsonl", "mqtt": "mqtt://broker/line3"}
    assert http == {"listen": "0.0.0.0:8080", "fps": 2}


@pytest.mark.parametrize("change, needle", [
    (('fps = 2', 'fsp = 2'), "line 18: unknown key 'fsp' in [http]"),
    (('reconnect = 3', 'reconnect = "three"'), "line 10: reconnect must be int, got str"),
    (('[outputs]', '[output]'), "line 12: unknown section or key 'output'"),
    (('camera = 0\n', 'camera = 0\nsource = "x.mp4"\n'), "camera 2 needs exactly one of source or camera"),
    (('name = "right"', 'name = "left"'), "two cameras are named 'left'"),
    (('listen = "0.0.0.0:8080"', 'listen = 8080'), "line 17: listen must be str, got int"),
    (('jsonl = "results.jsonl"', 'jsonl = '), "Invalid value"),
])
def test_station_file_mistakes_name_the_line(tmp_path, video, change, needle):
    path = tmp_path / "station.toml"
    path.write_text(STATION.format(video=video).replace(*change))
    with pytest.raises(ClipadError) as err:
        station_from_file(str(path), None)
    assert needle in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


@pytest.mark.parametrize("args, needle", [
    (["--mqtt", "mqtt://"], "--mqtt mqtt://: expected mqtt://HOST"),
    (["--mqtt", "http://broker/x"], "expected mqtt://HOST"),
    (["--mqtt", "mqtt://u:secret@broker:99999/x"], "port"),
    (["--webhook", "ftp://x/y"], "--webhook ftp://x/y: expected http://HOST"),
    (["--http", "99999"], "--http 99999: expected [HOST:]PORT"),
    (["--http", "BUSY"], "cannot listen there"),
    (["--source", "a=VIDEO", "--source", "a=VIDEO"], "two cameras are named 'a'"),
    (["--class-name", "nut"], "unknown class name 'nut'"),
    (["--config", "STATION"], "--camera/--source and --config both declare cameras"),
    (["--http-token", "x"], "--http-token needs --http"),
    (["--spool-max-mb", "0"], "--spool-max-mb 0"),
])
def test_usage_errors_are_one_line_before_anything_runs(model, video, tmp_path, capsys, args, needle):
    sock, port = busy_port()
    (tmp_path / "station.toml").write_text(STATION.format(video=video))
    args = [{"BUSY": str(port), "VIDEO": video, "STATION": str(tmp_path / "station.toml")}.get(a, a)
            .replace("VIDEO", video) for a in args]
    source = [] if any(a.startswith("a=") for a in args) else ["--source", video]
    try:
        assert edge_detect(["--model", str(model), *source, *args, "--jsonl", str(tmp_path / "r.jsonl"),
                            "-q"]) == 2
    finally:
        sock.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "secret" not in err[0], err
    assert not (tmp_path / "r.jsonl").exists()            # nothing ran


def test_a_broker_that_is_down_is_not_a_usage_error(model, video, tmp_path):
    down = socket.socket()
    down.bind(("127.0.0.1", 0))
    port = down.getsockname()[1]
    down.close()
    out = tmp_path / "r.jsonl"
    assert edge_detect(["--model", str(model), "--source", video, "--mqtt", f"mqtt://127.0.0.1:{port}/line",
                        "--jsonl", str(out), "--drain-s", "0.5", "-q"]) == 0
    assert len(out.read_text().splitlines()) == 6
    spool = out.parent / "r.jsonl.spool"
    assert sum(len(files) for _, _, files in os.walk(spool)) == 6     # kept for the next run, nothing lost


def test_frames_of_several_cameras_share_one_inference(model, video, monkeypatch):
    """Three finite sources, an export of batch 1…4: frames of different cameras go through one inference."""
    from clipad.runtime.backends.onnxruntime import OnnxRuntimeBackend

    sizes = []
    real = OnnxRuntimeBackend._infer

    def counting(self, batch):
        sizes.append(len(batch))
        return real(self, batch)

    monkeypatch.setattr(OnnxRuntimeBackend, "_infer", counting)
    assert edge_detect(["--model", str(model), "--source", f"a={video}", "--source", f"b={video}", "--source",
                        f"c={video}", "-q"]) == 0
    assert sum(sizes) == 18 and max(sizes) == 3 and sizes.count(3) >= 4


def test_records_carry_camera_seq_and_run(model, video, tmp_path):
    out = tmp_path / "r.jsonl"
    assert edge_detect(["--model", str(model), "--source", f"x={video}", "--source", f"y={video}", "--jsonl",
                        str(out), "--save", str(tmp_path / "ov"), "-q"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for camera in ("x", "y"):
        assert [r["seq"] for r in rows if r["camera"] == camera] == list(range(1, 7))
    assert len({r["run"] for r in rows}) == 1
    assert sorted(os.listdir(tmp_path / "ov")) == ["x", "y"] and len(os.listdir(tmp_path / "ov" / "x")) == 6


def test_spool_bound_order_and_leftovers(tmp_path):
    spool = Spool(str(tmp_path / "s"), max_bytes=100, memory=2)
    for i in range(10):
        spool.push(json.dumps({"i": i}).encode())    # 8 bytes each
    assert len(spool) == 10 and spool.dropped == 0
    spool.push(b"x" * 40)                             # 120 bytes: the three oldest go
    assert spool.dropped == 3 and len(spool) == 8 and spool.bytes == 96
    seq, data = spool.oldest()
    assert json.loads(data) == {"i": 3}               # read back from disk (beyond the 2 kept in memory)
    spool.done(seq)
    again = Spool(str(tmp_path / "s"), max_bytes=100)  # a new run: leftovers first, in order
    assert again.carried_over == 7 and json.loads(again.oldest()[1]) == {"i": 4}
    again.push(b"{}")
    assert sorted(os.listdir(tmp_path / "s"))[-1] == f"{again.next - 1:012d}.json"


def test_spool_on_a_full_disk_drops_and_counts(tmp_path, monkeypatch):
    from clipad.runtime.station import spool as spool_module

    spool = Spool(str(tmp_path / "s"), max_bytes=10_000)

    def full(*a, **k):
        raise ClipadError("disk full")

    monkeypatch.setattr(spool_module, "write_bytes_atomic", full)
    spool.push(b"{}")
    assert spool.dropped == 1 and len(spool) == 0 and "disk full" in spool.last_error


def test_watchdog_hints(tmp_path):
    watch = CameraWatch()
    frame = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    for _ in range(30):
        watch.frame(frame)
    kinds = {w["kind"] for w in watch.warnings("c", 0.01)}
    assert "frozen_frame" in kinds
    watch = CameraWatch()
    watch.frame(np.zeros((48, 64, 3), np.uint8))
    assert "black_frame" in {w["kind"] for w in watch.warnings("c", None)}
    watch.frame(np.full((48, 64, 3), 255, np.uint8))
    assert "over_exposed" in {w["kind"] for w in watch.warnings("c", None)}
    calm = CameraWatch()
    rng = np.random.default_rng(1)
    for _ in range(200):
        calm.decision("NG" if rng.random() < 0.01 else "OK", float(rng.random()))
    assert calm.statistics("c", 0.01) == []           # a normal line: no statistical warning
    alarming = CameraWatch()
    for _ in range(200):
        alarming.decision("NG" if rng.random() < 0.2 else "OK", float(rng.random() * 0.1))
    kinds = {w["kind"] for w in alarming.statistics("c", 0.01)}
    assert kinds == {"ng_rate", "p_values"}
    sharp = CameraWatch()
    for _ in range(50):
        sharp.frame(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    sharp.frame(np.full((48, 64, 3), 128, np.uint8))
    assert "blur" in {w["kind"] for w in sharp.warnings("c", None)}


def test_the_example_station_file_and_unit_are_valid():
    from conftest import REPO

    cameras, outputs, http = station_from_file(str(REPO / "scripts" / "station.example.toml"), None)
    assert [c.name for c in cameras] == ["top", "side"] and outputs["mqtt_on"] == "all" and http["fps"] == 5
    unit = (REPO / "scripts" / "clipad-station.service").read_text()
    assert "SuccessExitStatus=143" in unit and "--config" in unit


def test_mqtt_sink_survives_a_connack_before_its_constructor_returns(tmp_path, monkeypatch):
    """The network thread can call on_connect before MqttSink.__init__ has finished (seen with two cameras: the
    second client's thread died and its records stayed spooled): every attribute it reads exists before it starts."""
    import paho.mqtt.client as mqtt

    from clipad.runtime.station.sinks import MqttSink

    def instant_loop_start(client):
        client.on_connect(client, None, None, mqtt.ReasonCode(mqtt.PacketTypes.CONNACK, "Success"), None)
        return mqtt.MQTT_ERR_SUCCESS

    monkeypatch.setattr(mqtt.Client, "loop_start", instant_loop_start)
    monkeypatch.setattr(mqtt.Client, "connect_async", lambda *a, **k: None)
    monkeypatch.setattr(mqtt.Client, "loop_stop", lambda *a, **k: None)
    sink = MqttSink("mqtt://127.0.0.1:1/line", None, "b", "run", Spool(str(tmp_path / "s"), 10_000), "all")
    assert sink.connected is True and sink.status()["connected"] is True
