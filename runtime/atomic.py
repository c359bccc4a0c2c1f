"""The one atomic file writer: write a temp file beside the target, then rename it over the target.

A crash, Ctrl-C or full disk leaves either the old file or the new one, never a half-written file; the temp file is
removed on failure. Files are created with ``open(..., "xb")`` so they honour the umask (tempfile's are 0600).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from typing import Any, BinaryIO, Callable

from .errors import ClipadError


def temp_path_beside(path: str, suffix: str = ".tmp") -> str:
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:12]}{suffix}")


def write_atomic(path: str, write: Callable[[BinaryIO], Any], durable: bool = False, mode: int | None = None) -> str:
    """Call ``write(binary_file)`` on a temp file beside ``path`` and rename it to ``path``; returns ``path``.

    ``durable`` also fsyncs before the rename (manifests, engines; not per-frame outputs, where it costs latency);
    ``mode`` sets the new file's permission bits (to keep those of the file it replaces).
    OSError (full disk, permissions, missing folder) becomes a one-line ClipadError naming ``path``.
    """
    path = os.fspath(path)
    tmp = temp_path_beside(path)
    try:
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        with open(tmp, "xb") as fh:
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise ClipadError(f"{path}: could not write ({exc.strerror or exc})") from None
    except BaseException:
        _remove(tmp)
        raise
    return path


def write_bytes_atomic(path: str, data: bytes, durable: bool = False, mode: int | None = None) -> str:
    return write_atomic(path, lambda fh: fh.write(data), durable, mode)


def write_json_atomic(path: str, data: Any, mode: int | None = None) -> str:
    """Strict JSON (NaN/inf are refused: they are not JSON), indented, newline-terminated."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    return write_bytes_atomic(path, text.encode(), durable=True, mode=mode)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def make_temp_dir_beside(path: str, tag: str) -> str:
    """A hidden work folder next to ``path`` (same file system, so the final rename is atomic), with the umask's
    permissions (mkdtemp's 0700 would make a finished export folder private). Its name carries this process's id,
    so ``remove_stale_temp_dirs`` can tell the leftovers of dead processes."""
    folder, base = os.path.split(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix=f".{base}.{tag}-{os.getpid()}-", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def remove_stale_temp_dirs(path: str, tag: str) -> list[str]:
    """Remove the work folders that ``make_temp_dir_beside(path, tag)`` left behind in processes that are gone
    (killed hard, power loss); a live process's folder is left alone. Returns what was removed."""
    import re

    folder, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(rf"^\.{re.escape(base)}\.{re.escape(tag)}-(\d+)-")
    removed = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        match = pattern.match(name)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process
        return True
    return True


def replace_dir(tmp: str, out: str) -> None:
    """Swap a finished temp folder into place; an existing ``out`` is moved aside first, then removed."""
    if os.path.exists(out):
        old = make_temp_dir_beside(out, "old")
        os.rmdir(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
