"""Streams that stop delivering, against a real local MJPEG server that the test kills: gaps become error records,
reconnects pick the stream up again, and when they run out the run ends with a one-line error and a summary."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from clipad.runtime.detect.cli import main as edge_detect
from tiny_fixtures import export_tiny

SERVER = os.path.join(os.path.dirname(__file__), "mjpeg_server.py")


@pytest.fixture(scope="module")
def model_dir(tiny_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "clip"
    assert export_tiny(tiny_files, out, "clip") == 0
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, SERVER, str(port)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the MJPEG test server did not start")


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_in_thread(args, result):
    thread = threading.Thread(target=lambda: result.append(edge_detect(args)), daemon=True)
    thread.start()
    return thread


def wait_for(condition, seconds=60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_reconnects_after_the_server_comes_back(model_dir, tmp_path, capsys):
    port = free_port()
    server = start_server(port)
    jsonl, result = tmp_path / "r.jsonl", []
    thread = run_in_thread(["--model", str(model_dir), "--source", f"http://127.0.0.1:{port}/cam.mjpg",
                            "--reconnect", "5", "--max-frames", "25", "--jsonl", str(jsonl), "-q"], result)
    try:
        assert wait_for(lambda: len(records(jsonl)) >= 5)
        server.kill()
        server.wait()
        assert wait_for(lambda: any(r["error"] and "reconnect 1/5" in r["error"] for r in records(jsonl)))
        server = start_server(port)
        thread.join(120)
    finally:
        server.kill()
    assert result == [0]
    rows = records(jsonl)
    errors = [r["error"] for r in rows if r["error"]]
    assert any("reconnected" in e for e in errors)
    frames = [r for r in rows if r["error"] is None]
    assert len(frames) == 25 and all(r["score"] is not None for r in frames)
    assert all(r["frame"] is None for r in rows if r["error"])


def run_until_the_server_dies(model_dir, jsonl, *extra) -> list:
    """edge-detect on a live local MJPEG stream whose server is killed after three records; its exit code."""
    port = free_port()
    server = start_server(port)
    result = []
    thread = run_in_thread(["--model", str(model_dir), "--source", f"http://127.0.0.1:{port}/cam.mjpg",
                            *extra, "--jsonl", str(jsonl), "-q"], result)
    try:
        assert wait_for(lambda: len(records(jsonl)) >= 3)
    finally:
        server.kill()
        server.wait()
    thread.join(60)
    return result


def test_gives_up_with_a_summary_when_reconnects_run_out(model_dir, tmp_path, capsys):
    jsonl = tmp_path / "r.jsonl"
    assert run_until_the_server_dies(model_dir, jsonl, "--reconnect", "2") == [2]
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edge-detect: error:") and "gave up after 2 reconnect attempt(s)" in err[-1]
    gaps = [r["error"] for r in records(jsonl) if r["error"]]
    assert [g.split("; ")[-1].split(" in ")[0] for g in gaps if "reconnect" in g] == ["reconnect 1/2", "reconnect 2/2"]
    for line in jsonl.read_text().splitlines():   # every line is complete JSON
        json.loads(line)


def test_without_reconnect_a_lost_stream_just_ends(model_dir, tmp_path):
    jsonl = tmp_path / "r.jsonl"
    assert run_until_the_server_dies(model_dir, jsonl) == [0] and all(r["error"] is None for r in records(jsonl))
