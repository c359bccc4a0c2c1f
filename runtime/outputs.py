"""Where edge-detect writes, checked before the first frame: output folders that can be written, a JSONL file that is
appended to (never truncated) in whole lines, and no output that would overwrite an input."""
from __future__ import annotations

import errno
import json
import os

from .errors import ClipadError


def probe_folder(path: str, flag: str) -> str:
    """Create ``path`` if needed and prove it is a writable folder (one-line errors otherwise)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ClipadError(f"{flag} {path}: exists and is not a folder")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ClipadError(f"{flag} {path}: parent folder {parent} does not exist")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".clipad-probe-{os.getpid()}")
        with open(probe, "xb"):
            pass
        os.unlink(probe)
    except OSError as exc:
        raise ClipadError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None
    return path


def refuse_overwriting_inputs(planned: dict[str, list[str]], inputs: list[str]) -> None:
    """``planned``: flag -> output paths it will write. Any output that is an input file (real paths, symlinks
    resolved) is refused before anything is written."""
    real_inputs = {os.path.realpath(p) for p in inputs}
    for flag, paths in planned.items():
        for path in paths:
            if os.path.realpath(path) in real_inputs:
                raise ClipadError(f"{flag} would overwrite the input {path}; choose an output that is not an input")


def export_files(model_dir: str) -> list[str]:
    """The files an export owns: its manifest and every model file and engine the manifest lists."""
    from .manifest import MANIFEST_NAME, Manifest

    manifest = Manifest.read(model_dir)
    names = [MANIFEST_NAME, *manifest.files, *(e.file for e in manifest.engines)]
    return [os.path.join(model_dir, name) for name in names]


def refuse_reports_over(reports: dict[str, str | None], model_dir: str, inputs: list[str] = ()) -> None:
    """Report files (flag -> path or None) of the benchmark and evaluation commands may not replace a file of the
    export they measure or one of their inputs: checked before anything runs."""
    refuse_overwriting_inputs({flag: [path] for flag, path in reports.items() if path},
                              export_files(model_dir) + list(inputs))


class JsonlAppender:
    """One JSON object per line, appended with one ``write`` per line (O_APPEND): an existing file is kept and
    extended, two processes appending to the same file interleave whole lines, and a failed write (full disk) is
    cut back so the file still ends with a complete line."""

    def __init__(self, path: str):
        if os.path.isdir(path):
            raise ClipadError(f"--jsonl {path}: is a folder; give a file name")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ClipadError(f"--jsonl {path}: parent folder {parent} does not exist")
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as exc:
            raise ClipadError(f"--jsonl {path}: cannot write ({exc.strerror or exc})") from None
        self.path = path

    def write(self, record: dict) -> None:
        data = (json.dumps(record, allow_nan=False) + "\n").encode()
        before = os.fstat(self.fd).st_size
        written = 0
        try:
            while written < len(data):
                written += os.write(self.fd, data[written:])
        except OSError as exc:
            self._cut_back(before, data)
            reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise ClipadError(f"--jsonl {self.path}: cannot write ({reason}); records up to the previous input are "
                              f"complete") from None

    def _cut_back(self, before: int, data: bytes) -> None:
        """Remove a partly written record: what follows ``before`` is cut when it is a prefix of ``data`` (so not a
        line another process appended meanwhile)."""
        try:
            size = os.fstat(self.fd).st_size
            if before < size < before + len(data):
                with open(self.path, "rb") as fh:
                    fh.seek(before)
                    tail = fh.read()
                if data.startswith(tail):
                    os.ftruncate(self.fd, before)
        except OSError:
            pass

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
