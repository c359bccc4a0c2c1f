"""An advisory lock on a file in a folder, for read-modify-write of shared files (the manifest).

``flock`` locks belong to an open file, so the kernel releases them when the holder dies: a ``kill -9`` leaves the
lock file behind but never a held lock, and the next writer goes ahead at once. The lock file records the holder's
pid for messages only. Rules: an exclusive lock in a folder this user cannot write is refused at once (the write would
fail anyway); a shared lock there proceeds unlocked (nobody can write it either); waiting longer than ``timeout``
seconds is a one-line error naming the holder. Linux/macOS (fcntl); local file systems.
"""
from __future__ import annotations

import errno
import os
import time

from .errors import ClipadError


class FileLock:
    def __init__(self, path: str, what: str, timeout: float = 120.0, shared: bool = False):
        self.path, self.what, self.timeout, self.shared = path, what, timeout, shared
        self.fd: int | None = None

    def _open(self) -> int | None:
        folder = os.path.dirname(os.path.abspath(self.path))
        if not self.shared and not os.access(folder, os.W_OK):
            raise ClipadError(f"{folder}: this folder is read-only for this user; cannot write {self.what}")
        try:
            return os.open(self.path, (os.O_RDONLY if self.shared else os.O_RDWR) | os.O_CREAT, 0o666)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                if os.path.exists(self.path):
                    return os.open(self.path, os.O_RDONLY)
                if self.shared:
                    return None
            raise ClipadError(f"{self.path}: cannot create the lock for {self.what} ({exc.strerror})") from None

    def acquire(self) -> "FileLock":
        import fcntl

        fd = self._open()
        if fd is None:
            return self
        deadline = time.monotonic() + self.timeout
        mode = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _holder(self.path)
                    os.close(fd)
                    raise ClipadError(f"{self.what} is locked by another process{holder} for more than "
                                      f"{self.timeout:g} s ({self.path}); try again when it has finished") from None
                time.sleep(0.05)
        self.fd = fd
        if not self.shared:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:
                pass   # the pid is only for messages
        return self

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)   # closing the descriptor releases the flock

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(path: str) -> str:
    try:
        with open(path) as fh:
            pid = int(fh.read().strip() or 0)
    except (OSError, ValueError):
        return ""
    return f" (pid {pid})" if pid else ""


def pause_point(name: str) -> None:
    """Test hook: with CLIPAD_PAUSE=NAME:FILE in the environment, a process reaching point NAME creates FILE.waiting
    and waits (up to 10 minutes) until FILE exists, so a test can make two commands overlap deterministically."""
    spec = os.environ.get("CLIPAD_PAUSE", "")
    point, _, flag = spec.partition(":")
    if point != name or not flag:
        return
    with open(flag + ".waiting", "w"):
        pass
    deadline = time.monotonic() + 600
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.05)
