"""Where the commands write, checked before the first image: output folders and report files that can be written, a
JSONL file that is appended to (never truncated) in whole lines, no output that would overwrite an input or land
inside an input folder, and no report over a file of the export it measures."""
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


def probe_file(path: str | None, flag: str) -> str | None:
    """A report file that can be written: not a folder, its folder exists and is writable (checked before the run,
    so a long run never ends in a lost report)."""
    if path is None:
        return None
    if os.path.isdir(path):
        raise ClipadError(f"{flag} {path}: is a folder; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ClipadError(f"{flag} {path}: parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ClipadError(f"{flag} {path}: cannot write there (permission denied)")
    return path


def refuse_outputs_inside(folders: dict[str, str | None], input_folders: list[tuple[str, bool]]) -> None:
    """Output folders (flag -> folder) may not be a folder the inputs are listed from (with ``True``: or lie inside
    it, for a recursive glob): the next run would read the outputs as inputs."""
    for flag, folder in folders.items():
        if not folder:
            continue
        real = os.path.realpath(folder)
        for root, recursive in input_folders:
            root = os.path.realpath(root)
            if real == root or (recursive and real.startswith(root + os.sep)):
                raise ClipadError(f"{flag} {folder}: the inputs are read from {root}; the next run would read these "
                                  f"outputs as inputs. Choose a folder outside it")


def export_files(model_dir: str) -> list[str]:
    """The files an export owns: its manifest, lock, and every model file and engine the manifest lists."""
    from .manifest import Manifest

    return [os.path.join(model_dir, name) for name in Manifest.read(model_dir).owned_files()]


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
