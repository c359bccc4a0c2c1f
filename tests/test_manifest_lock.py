"""Two commands on one export never lose each other's work: every writer goes through Manifest.update (lock, re-read,
change, files and manifest together). The overlap is made deterministic with the CLIPAD_PAUSE hook, not a sleep; the
lock's rules (a holder killed with -9, a read-only folder, a timeout) are each tested."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipad.calibration.cli import main as edge_calibrate
from clipad.runtime.errors import ClipadError
from clipad.runtime.manifest import Manifest, lock
from tiny_fixtures import export_tiny, write_good_samples

EXPORT_ENGINE = os.path.join(os.path.dirname(sys.executable), "export-engine")
EDGE_CALIBRATE = os.path.join(os.path.dirname(sys.executable), "edge-calibrate")


@pytest.fixture(scope="module")
def model(tiny_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("lock") / "aa"
    assert export_tiny(tiny_files, out, "aaclip", ["--no-engine"]) == 0
    return out


@pytest.fixture(scope="module")
def normal(tmp_path_factory):
    return write_good_samples(tmp_path_factory.mktemp("normal"), 12, seed=4)


def wait_for(path: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.parametrize("precision", ["int8-cpu", "fp16"])
def test_a_calibration_finished_during_a_precision_export_survives(model, normal, tmp_path, precision):
    copy = tmp_path / "aa"
    shutil.copytree(model, copy)
    flag = tmp_path / "go"
    env = dict(os.environ, CLIPAD_PAUSE=f"before-manifest-update:{flag}")
    export = subprocess.Popen([EXPORT_ENGINE, "--from-onnx", str(copy), "--precision", precision,
                               "--accept-accuracy-loss", "--no-engine", "-q"], env=env, stderr=subprocess.PIPE,
                              text=True)
    try:
        wait_for(Path(f"{flag}.waiting"))        # the export has read the manifest and made its file, and waits
        assert edge_calibrate(["--model", str(copy), "--normal", str(normal), "--target-fpr", "0.2",
                               "--class-name", "screw", "-q"]) == 0
        flag.touch()
        assert export.wait(timeout=120) == 0, export.stderr.read()
    finally:
        if export.poll() is None:
            export.kill()
    m = Manifest.read(str(copy))
    assert [(c.precision, sorted(c.classes)) for c in m.calibrations] == [("fp32", ["screw"])]
    file = {"int8-cpu": "model.int8-cpu.onnx", "fp16": "model.fp16.onnx"}[precision]
    assert file in m.files and precision in m.precisions
    m.verify_file(str(copy), file)               # the installed file is the one the manifest lists


def holder(model_dir: Path) -> subprocess.Popen:
    """Another process that takes the export's lock and keeps it."""
    code = ("import sys, time\nfrom clipad.runtime.manifest import lock\n"
            f"held = lock({str(model_dir)!r}).acquire()\nprint('locked', flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_held_lock_times_out_naming_the_holder_and_kill_9_frees_it(model, tmp_path):
    copy = tmp_path / "aa"
    shutil.copytree(model, copy)
    proc = holder(copy)
    try:
        with pytest.raises(ClipadError, match=rf"locked by another process \(pid {proc.pid}\) for more than 0.3 s"):
            Manifest.update(str(copy), lambda m: None, timeout=0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        started = time.monotonic()
        Manifest.update(str(copy), lambda m: m.extra.update(after_kill=True), timeout=10)
        assert time.monotonic() - started < 5    # the kernel released the dead holder's lock: no stale wait
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads((copy / "manifest.json").read_text())["after_kill"] is True


@pytest.fixture
def read_only_copy(model, tmp_path):
    """A copy of the export in a folder this process cannot write: chmod 555 for a normal user; for root (who ignores
    permissions) a read-only bind mount of it."""
    source = tmp_path / "aa"
    shutil.copytree(model, source)
    if os.geteuid() != 0:
        os.chmod(source, 0o555)
        yield source
        os.chmod(source, 0o755)
        return
    target = tmp_path / "ro"
    target.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"root cannot make a read-only folder here (mount: {mounted.stderr.strip()})")
    try:
        remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], capture_output=True, text=True)
        assert remount.returncode == 0, remount.stderr
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_a_read_only_model_folder_is_refused_before_any_image_runs(read_only_copy, normal):
    before = (read_only_copy / "manifest.json").read_text()
    proc = subprocess.run([EDGE_CALIBRATE, "--model", str(read_only_copy), "--normal", str(normal), "--target-fpr",
                           "0.2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"edge-calibrate: error: --model {read_only_copy}: the model folder is read-only for this user; its manifest "
        f"cannot be updated"]                    # one line, before any image ran (no progress bar)
    assert (read_only_copy / "manifest.json").read_text() == before
    with pytest.raises(ClipadError, match="read-only for this user; cannot write"):
        lock(str(read_only_copy)).acquire()


def test_model_files_change_only_together_with_their_manifest(model, tmp_path):
    copy = tmp_path / "aa"
    shutil.copytree(model, copy)
    old = (copy / "model.onnx").read_bytes()
    staged = tmp_path / "new.onnx"
    staged.write_bytes(b"a new file")
    before = (copy / "manifest.json").read_text()

    def refuse(manifest):
        raise ClipadError("changed my mind")

    with pytest.raises(ClipadError, match="changed my mind"):
        Manifest.update(str(copy), refuse, files={"model.onnx": str(staged)})
    assert (copy / "model.onnx").read_bytes() == old and (copy / "manifest.json").read_text() == before
    assert sorted(os.listdir(copy)) == [".manifest.json.lock", "manifest.json", "model.onnx"]   # no backup left
