"""Unattended runs, tried as a hostile and careless user: nothing of the user's is lost, nothing fails open, and
every bad argument is one line with a non-zero exit."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from clipad.export import cli as export_cli
from clipad.runtime.detect.cli import main as edge_detect
from clipad.runtime.errors import ClipadError
from clipad.runtime.files import JsonlAppender
from clipad.runtime.manifest import Manifest
from tiny_fixtures import TINY, export_tiny, write_video

EDGE_DETECT = os.path.join(os.path.dirname(sys.executable), "edge-detect")


@pytest.fixture(scope="module")
def model_dir(tiny_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "clip"
    assert export_tiny(tiny_files, out, "clip") == 0
    return out


def jpegs(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return folder


def one_line_error(capsys, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(("edge-detect: error:", "export-engine: error:")) and needle in err[-1], err
    assert "Traceback" not in "\n".join(err)


# ---- nothing of the user's is lost --------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--save", "--jsonl", "--jsonl-symlink"])
def test_outputs_never_overwrite_inputs(model_dir, tmp_path, capsys, flag):
    folder = jpegs(tmp_path / "imgs")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    if flag == "--save":
        args = ["--save", str(folder)]
    elif flag == "--jsonl":
        args = ["--jsonl", str(folder / "1.jpg")]
    else:
        os.symlink(folder / "2.jpg", tmp_path / "link.jsonl")
        args = ["--jsonl", str(tmp_path / "link.jsonl")]
    assert edge_detect(["--model", str(model_dir), "--source", str(folder), *args, "-q"]) == 2
    one_line_error(capsys, "the next run would read these outputs as inputs" if flag == "--save"
                   else "would overwrite the input")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_jsonl_is_appended_never_truncated(model_dir, tmp_path):
    folder = jpegs(tmp_path / "imgs")
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text('{"earlier": "run"}\n')
    assert edge_detect(["--model", str(model_dir), "--source", str(tmp_path / "missing"), "--jsonl", str(jsonl),
                        "-q"]) == 2                       # fails at the start: file untouched
    assert jsonl.read_text() == '{"earlier": "run"}\n'
    assert edge_detect(["--model", str(model_dir), "--source", str(folder), "--jsonl", str(jsonl), "-q"]) == 0
    lines = jsonl.read_text().splitlines()
    assert lines[0] == '{"earlier": "run"}' and len(lines) == 4


def test_two_processes_append_whole_lines(model_dir, tmp_path):
    folder = jpegs(tmp_path / "imgs", 30)
    jsonl = tmp_path / "shared.jsonl"
    procs = [subprocess.Popen([EDGE_DETECT, "--model", str(model_dir), "--source", str(folder), "--jsonl",
                               str(jsonl), "-q"]) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(rows) == 60 and sorted(r["source"] for r in rows) == sorted(2 * [str(p) for p in folder.iterdir()])


def test_full_disk_is_one_line_and_leaves_complete_lines(model_dir, tmp_path, capsys, monkeypatch):
    folder = jpegs(tmp_path / "imgs", 5)
    jsonl = tmp_path / "r.jsonl"
    real_write, calls = os.write, {"n": 0}

    def filling_write(fd, data):
        if fd == appender_fd["fd"]:
            calls["n"] += 1
            if calls["n"] == 3:                       # the 3rd record: half of it fits, then the disk is full
                real_write(fd, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    appender_fd = {"fd": None}
    original_init = JsonlAppender.__init__

    def remember(self, path):
        original_init(self, path)
        appender_fd["fd"] = self.fd

    monkeypatch.setattr(JsonlAppender, "__init__", remember)
    monkeypatch.setattr(os, "write", filling_write)
    assert edge_detect(["--model", str(model_dir), "--source", str(folder), "--jsonl", str(jsonl), "-q"]) == 2
    one_line_error(capsys, "disk full")
    text = jsonl.read_text()
    assert text.endswith("\n") and [json.loads(line) for line in text.splitlines()]   # complete lines only
    assert len(text.splitlines()) == 2


def test_reexport_refuses_a_folder_with_foreign_files(tiny_files, tmp_path, capsys):
    out = tmp_path / "m"
    assert export_tiny(tiny_files, out, "clip") == 0
    (out / "notes.txt").write_text("mine")
    (out / "results").mkdir()
    assert export_tiny(tiny_files, out, "clip") == 2
    one_line_error(capsys, "holds files export-engine did not write (notes.txt, results)")
    assert (out / "notes.txt").read_text() == "mine" and (out / "results").is_dir()


def test_sigterm_during_export_leaves_nothing_and_stale_partials_go(tiny_files, tmp_path):
    out = tmp_path / "m"
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from clipad.export import cli
        import clipad.export.onnx_export as ox
        import time
        real = ox.export_onnx
        def slow(*a, **k):
            print("exporting", flush=True)
            time.sleep(60)
        ox.export_onnx = slow
        sys.exit(cli.main(["--model", "clip", "--arch", "{TINY}", "--image-size", "56", "--random-init",
                           "--class-name", "x", "--output", {str(out)!r}, "-q"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "exporting"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert "terminated; nothing written" in proc.stderr.read()
    assert os.listdir(tmp_path) == []
    stale = tmp_path / ".m.partial-999999999-abc"      # left by a process that no longer exists
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"x")
    assert export_cli.main(["--model", "clip", "--arch", TINY, "--image-size", "56", "--random-init",
                            "--class-name", "x", "--output", str(out), "-q"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["m"]


# ---- bad arguments are one line -------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["--threads", "100000"], "--threads 100000: must be between 1 and"),
    (["--threads", "-1"], "--threads -1"),
    (["--camera", "-1"], "camera -1: camera indices start at 0"),
    (["--reconnect", "-2"], "--reconnect -2"),
    (["--save", "/proc/no/such/parent/x"], "parent folder"),
    (["--save-maps", "FILE"], "exists and is not a folder"),
    (["--jsonl", "DIR"], "is a folder"),
])
def test_edge_detect_bad_arguments(model_dir, tmp_path, capsys, args, needle):
    folder = jpegs(tmp_path / "imgs")
    (tmp_path / "FILE").write_text("x")
    args = [str(tmp_path / a) if a in ("FILE", "DIR") else a for a in args]
    (tmp_path / "DIR").mkdir()
    source = [] if "--camera" in args else ["--source", str(folder)]
    assert edge_detect(["--model", str(model_dir), *source, *args, "-q"]) == 2
    one_line_error(capsys, needle)


def test_symlink_loops_and_unreadable_entries_are_records(model_dir, tmp_path):
    folder = jpegs(tmp_path / "imgs", 2)
    os.symlink(folder / "loop.png", folder / "loop.png")          # a symlink pointing at itself
    os.symlink(tmp_path / "gone.jpg", folder / "broken.jpg")
    jsonl = tmp_path / "r.jsonl"
    assert edge_detect(["--model", str(model_dir), "--source", str(folder), "--jsonl", str(jsonl), "-q"]) == 0
    rows = {os.path.basename(r["source"]): r for r in map(json.loads, jsonl.read_text().splitlines())}
    assert set(rows) == {"0.jpg", "1.jpg", "loop.png", "broken.jpg"}
    assert rows["loop.png"]["error"] and rows["broken.jpg"]["error"] and rows["0.jpg"]["error"] is None


def test_onnx_that_does_not_match_the_manifest_fails_at_open(model_dir, tmp_path, capsys):
    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    m = Manifest.read(str(copy))
    m.model.image_size = 112                         # as if the manifest belonged to another export
    m.input.shape[1:3] = [112, 112]
    m.outputs[0].shape[2:] = [112, 112]
    m.write(str(copy))
    assert edge_detect(["--model", str(copy), "--source", str(jpegs(tmp_path / "i", 1)), "-q"]) == 2
    one_line_error(capsys, "does not belong to this manifest")


def test_class_names_that_do_not_match_the_graph_fail_at_open(model_dir, tmp_path, capsys):
    """One class name for a two-channel graph: refused when the model is opened (it was an IndexError traceback at
    the first image, or a silent "no calibration" with the other name)."""
    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    m = Manifest.read(str(copy))
    assert len(m.class_names) == 2
    m.model.class_names = ["b"]
    m.outputs[0].shape[1], m.outputs[1].shape[1] = 1, 1   # a consistent manifest, for another graph
    m.write(str(copy))
    assert edge_detect(["--model", str(copy), "--source", str(jpegs(tmp_path / "i", 1)), "--class-name", "b",
                        "-q"]) == 2
    one_line_error(capsys, "the model has 2 output channel(s) but the manifest names 1 class(es)")
    m.outputs[0].shape[1], m.outputs[1].shape[1] = 2, 2   # the shapes say 2, the names 1: the manifest is invalid
    (copy / "manifest.json").write_text(json.dumps(m.to_dict()))
    assert edge_detect(["--model", str(copy), "--source", str(jpegs(tmp_path / "i", 1)), "-q"]) == 2
    one_line_error(capsys, "does not fit 1 class name(s)")


@pytest.mark.parametrize("args, needle", [
    (["--image-size", "0"], "--image-size 0"),
    (["--ckpt", "x.pth"], "takes no checkpoint"),
    (["--verify-images", "/no/such/folder"], "--verify-images"),
    (["--precision", "int8", "--calib-data", "EMPTY"], "no image files"),
    (["--clip-weights", "DIR", "--no-random"], "is a folder"),
])
def test_export_arguments_fail_before_any_weights_load(tiny_files, tmp_path, capsys, monkeypatch, args, needle):
    from clipad.export import weights

    def never(*a, **k):
        raise AssertionError("weights were loaded before the arguments were checked")

    monkeypatch.setattr(weights, "random_state_dict", never)
    monkeypatch.setattr(weights, "read_state_dict", never)
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "DIR").mkdir()
    args = [str(tmp_path / a) if a in ("EMPTY", "DIR") else a for a in args]
    base = ["--model", "clip", "--arch", TINY, "--image-size", "56", "--class-name", "x", "--output",
            str(tmp_path / "out"), "-q"]
    if "--no-random" in args:
        args.remove("--no-random")
    else:
        base.append("--random-init")
    assert export_cli.main(base + args) == 2
    one_line_error(capsys, needle)


def fake_packages(root, *names):
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on this edge box')\n")
    return root


def test_from_onnx_on_a_torch_free_edge_box(model_dir, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    env = dict(os.environ, PYTHONPATH=str(fake_packages(tmp_path / "fake", "torch", "onnx")))
    exe = os.path.join(os.path.dirname(sys.executable), "export-engine")
    proc = subprocess.run([exe, "--from-onnx", str(copy), "--precision", "fp16", "-q"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "has no model.fp16.onnx" in proc.stderr and "clipad-edge[export]" in proc.stderr


def test_engine_build_on_a_torch_free_box(model_dir, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    env = dict(os.environ, PYTHONPATH=str(fake_packages(tmp_path / "fake", "torch", "onnx")))
    exe = os.path.join(os.path.dirname(sys.executable), "export-engine")
    proc = subprocess.run([exe, "--from-onnx", str(copy), "--precision", "fp32", "--trt-flavor", "rtx",
                           "--compute-capability", "8.6", "-q"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [e.file for e in Manifest.read(str(copy)).engines] == ["model.fp32.rtx-sm86.engine"]


def test_messages_say_what_is_wrong(tmp_path):
    from clipad.export.weights import read_state_dict, torch_load

    rng = np.random.default_rng(0)   # seeded: damaged bytes fail in different places inside torch.load
    for blob in [rng.integers(0, 256, 4000, dtype=np.uint8).tobytes() for _ in range(30)] + [b"\x80\x02" + b"x" * 50]:
        (tmp_path / "random.pth").write_bytes(blob)
        with pytest.raises(ClipadError, match="random.pth: not a torch checkpoint, or corrupt or truncated"):
            torch_load(str(tmp_path / "random.pth"), "--ckpt")
    with pytest.raises(ClipadError, match="is a folder"):
        read_state_dict(str(tmp_path))
    with pytest.raises(ClipadError, match="is a folder"):
        torch_load(str(tmp_path), "--ckpt")


def test_truncated_video_says_how_many_frames_came(model_dir, tmp_path):
    rng = np.random.default_rng(1)
    path = write_video(tmp_path / "clip.avi", [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(20)])
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    jsonl = tmp_path / "r.jsonl"
    assert edge_detect(["--model", str(model_dir), "--source", path, "--jsonl", str(jsonl), "-q"]) == 0
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    last = rows[-1]
    assert last["error"] and "of the 20 frames its header promises" in last["error"]
    assert 0 < sum(r["error"] is None for r in rows) < 20


def test_stale_partials_of_live_processes_are_kept(tmp_path):
    from clipad.runtime.atomic import remove_stale_temp_dirs

    mine = tmp_path / f".out.partial-{os.getpid()}-x"
    mine.mkdir()
    dead = tmp_path / ".out.partial-999999999-y"
    dead.mkdir()
    assert remove_stale_temp_dirs(str(tmp_path / "out"), "partial") == [dead.name]
    assert mine.exists() and not dead.exists()


def test_export_folder_follows_the_umask(tiny_files, tmp_path):
    out = tmp_path / "m"
    old = os.umask(0o022)
    try:
        assert export_tiny(tiny_files, out, "clip") == 0
    finally:
        os.umask(old)
    assert (os.stat(out).st_mode & 0o777) == 0o755
    assert all((os.stat(out / f).st_mode & 0o777) == 0o644 for f in os.listdir(out))


def test_large_images_are_reduced_while_decoding(tmp_path):
    from clipad.runtime.inputs import load_image
    from clipad.runtime.render import resize_mask, scale_regions
    from clipad.runtime.sources import ImageFiles

    wide = np.zeros((60, 5000, 3), np.uint8)
    wide[:, 2500:] = 200
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(wide).save(tmp_path / "wide.jpg")
    assert load_image(str(tmp_path / "wide.png"), max_side=4096).size == (2500, 30)
    assert max(load_image(str(tmp_path / "wide.jpg"), max_side=4096).size) <= 4096
    assert load_image(str(tmp_path / "wide.png"), max_side=None).size == (5000, 60)   # without a bound: untouched
    assert load_image(str(tmp_path / "wide.png")).size == (2500, 30)      # the one policy every tool reads with
    frames = list(ImageFiles([str(tmp_path / "wide.png")]))
    assert frames[0].image.shape == (30, 2500, 3) and frames[0].original_size == (5000, 60)
    assert scale_regions([{"bbox": [10, 2, 4, 3], "area": 12, "max": 1.0, "kind": "peak"}], 2.0) == [
        {"bbox": [20, 4, 8, 6], "area": 48, "max": 1.0, "kind": "peak"}]
    assert resize_mask(np.zeros((30, 2500), np.uint8), (5000, 60)).shape == (60, 5000)


def test_loop_replays_a_video_and_soak_reports_slopes(model_dir, tmp_path):
    path = write_video(tmp_path / "clip.avi", [np.full((48, 64, 3), 40 * i, np.uint8) for i in range(4)])
    jsonl = tmp_path / "r.jsonl"
    assert edge_detect(["--model", str(model_dir), "--source", path, "--loop", "--max-frames", "10", "--jsonl",
                        str(jsonl), "-q"]) == 0
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["frame"] for r in rows] == list(range(10)) and all(r["error"] is None for r in rows)
    from clipad.benchmarks.soak import soak

    result = soak(str(model_dir), path, minutes=0.25, warmup=0.05, extra=[])
    assert result["frames"] > 10 and result["errors"] == 0
    assert result["rss_slope_mb_per_min"] is not None and result["latency_slope_ms_per_min"] is not None
