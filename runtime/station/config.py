"""What a station runs, as typed values: cameras (name, source, class, reconnect), outputs (files and sinks) and the
live view. Built from ``edge-detect``'s flags or from a station file (``--config station.toml``); every usage error
is one line that names the flag, or the file and line, before anything runs."""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, fields
from urllib.parse import urlsplit

from ..errors import ClipadError

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
ON = ("ng", "all")


@dataclass
class CameraConfig:
    name: str
    source: str | int               # camera index, URL, video, image, folder, glob or gst:PIPELINE
    class_name: str | None = None   # which baked class it reports (default: the model's first)
    reconnect: int = 0


@dataclass
class OutputsConfig:
    jsonl: str | None = None
    save: str | None = None
    save_maps: str | None = None
    save_masks: str | None = None
    mqtt: str | None = None          # mqtt://[USER[:PASS]@]HOST[:PORT]/PREFIX
    mqtt_on: str = "all"
    mqtt_password: str | None = None
    webhook: str | None = None
    webhook_on: str = "ng"
    webhook_timeout_s: float = 5.0
    evidence: str | None = None
    evidence_max_gb: float | None = None
    spool_dir: str | None = None
    spool_max_mb: float = 100.0
    drain_s: float = 30.0


@dataclass
class HttpConfig:
    host: str = "127.0.0.1"
    port: int | None = None          # None: no live view
    token: str | None = None
    fps: float = 5.0
    stall_s: float = 10.0


@dataclass
class StationConfig:
    cameras: list[CameraConfig]
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)

    @property
    def several(self) -> bool:
        return len(self.cameras) > 1


def split_named(value: str) -> tuple[str | None, str]:
    """``NAME=VALUE`` → (NAME, VALUE); a value that exists as a file or folder is always a path, a ``gst:`` pipeline
    is never split, and text before '=' that is not a valid name (``rtsp://h/x?a=b``) is part of the value."""
    if value.startswith("gst:") or os.path.exists(value):
        return None, value
    name, sep, rest = value.partition("=")
    return (name, rest) if sep and NAME.fullmatch(name) else (None, value)


def cameras_from_flags(cameras: list[str] | None, sources: list[str] | None, class_name: str | None,
                       reconnect: int) -> list[CameraConfig]:
    """``--camera`` and ``--source`` values in the order given; default names cam0, cam1, …"""
    out: list[CameraConfig] = []
    given = [("--camera", v) for v in cameras or []] + [("--source", v) for v in sources or []]
    for flag, value in given:
        name, spec = split_named(str(value))
        if flag == "--camera":
            if not spec.strip().lstrip("-").isdigit():
                raise ClipadError(f"--camera {value}: a camera index (0, 1, …), optionally NAME=INDEX")
            spec = int(spec)
        out.append(CameraConfig(name=name or "", source=spec, class_name=class_name, reconnect=reconnect))
    for i, camera in enumerate(out):
        if not camera.name:
            camera.name = f"cam{i}"
    check_names(out, "--camera/--source")
    return out


def check_names(cameras: list[CameraConfig], where: str) -> None:
    seen = set()
    for camera in cameras:
        if not NAME.fullmatch(camera.name):
            raise ClipadError(f"{where}: camera name {camera.name!r} must be a letter followed by up to 31 letters, "
                              f"digits, '-' or '_'")
        if camera.name in seen:
            raise ClipadError(f"{where}: two cameras are named {camera.name!r}")
        seen.add(camera.name)


def check_url(url: str | None, flag: str, schemes: tuple[str, ...]) -> None:
    if url is None:
        return
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ClipadError(f"{flag} {redact(url)}: the port is not a number") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise ClipadError(f"{flag} {redact(url)}: expected {schemes[0]}://HOST[:PORT]/… ")
    if port is not None and not 0 < port < 65536:
        raise ClipadError(f"{flag} {redact(url)}: port {port} out of range")


def redact(text: str) -> str:
    """Hide a password in ``scheme://user:pass@host`` (status, logs, records never show it)."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://[^/@:]*):[^/@]*@", r"\1:***@", str(text))


def parse_listen(value: str) -> tuple[str, int]:
    """``[HOST:]PORT`` → (host, port); host 127.0.0.1 by default."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ClipadError(f"--http {value}: expected [HOST:]PORT with a port 1-65535")
    return host, int(port)


def read_secret(value: str | None, file: str | None, env: str, flag: str) -> str | None:
    """A token or password from a file (one line), else the environment, else the command line."""
    if file:
        try:
            with open(file) as fh:
                text = fh.read().strip()
        except OSError as exc:
            raise ClipadError(f"{flag}-file {file}: cannot read ({exc.strerror})") from None
        if not text:
            raise ClipadError(f"{flag}-file {file}: empty")
        return text
    return os.environ.get(env) or value


# ---- station file ----------------------------------------------------------------------------------------------------
_SECTIONS = {"camera": CameraConfig, "outputs": OutputsConfig, "http": HttpConfig}
_FILE_KEYS = {"camera": {"name": str, "source": (str, int), "camera": int, "class": str, "reconnect": int},
              "outputs": {f.name: f.type for f in fields(OutputsConfig) if f.name != "mqtt_password"}
              | {"mqtt_password_file": str},
              "http": {"listen": str, "token_file": str, "fps": (int, float), "stall_s": (int, float)}}
_TYPES = {"str | None": (str,), "float | None": (int, float), "float": (int, float), "str": (str,), "int": (int,)}


def _line_of(text: str, section: str, key: str | None, index: int = 0) -> int:
    """The line of ``[section]`` (the ``index``-th for an array of tables) or of ``key`` inside it (1-based)."""
    lines = text.splitlines()
    header = re.compile(rf"^\s*\[\[?\s*{re.escape(section)}\s*\]\]?\s*(#.*)?$")
    starts = [i for i, line in enumerate(lines) if header.match(line)]
    if not starts:
        return 1
    start = starts[min(index, len(starts) - 1)]
    if key is None:
        return start + 1
    for i in range(start + 1, len(lines)):
        if re.match(r"^\s*\[", lines[i]):
            break
        if re.match(rf"^\s*{re.escape(key)}\s*=", lines[i]):
            return i + 1
    return start + 1


def load_station_file(path: str) -> dict:
    """The station file, checked: unknown keys and wrong types are one line naming the file and line."""
    if sys.version_info >= (3, 11):
        import tomllib  # novermin (tomli below on 3.10)
    else:   # JetPack 6's Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ClipadError(f"--config {path}: cannot read ({exc.strerror})") from None
    text = raw.decode("utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ClipadError(f"--config {path}: {exc}") from None
    for key, value in data.items():
        if key not in _SECTIONS:
            raise ClipadError(f"--config {path}, line {_line_of(text, key, None)}: unknown section or key {key!r} "
                              f"(known: [[camera]], [outputs], [http])")
        tables = value if key == "camera" else [value]
        if key == "camera" and not isinstance(value, list) or not all(isinstance(t, dict) for t in tables):
            raise ClipadError(f"--config {path}, line {_line_of(text, key, None)}: [{key}] must be "
                              + ("an array of tables ([[camera]])" if key == "camera" else "a table"))
        for index, table in enumerate(tables):
            for name, item in table.items():
                where = f"--config {path}, line {_line_of(text, key, name, index)}"
                allowed = _FILE_KEYS[key]
                if name not in allowed:
                    raise ClipadError(f"{where}: unknown key {name!r} in [{key}] (known: {', '.join(sorted(allowed))})")
                want = allowed[name]
                want = _TYPES.get(want, want) if isinstance(want, str) else want
                want = want if isinstance(want, tuple) else (want,)
                if isinstance(item, bool) or not isinstance(item, want):
                    raise ClipadError(f"{where}: {name} must be {' or '.join(t.__name__ for t in want)}, got "
                                      f"{type(item).__name__}")
    return data


def station_from_file(path: str, class_name: str | None) -> tuple[list[CameraConfig], dict, dict]:
    """(cameras, outputs settings, http settings) of a station file."""
    data = load_station_file(path)
    cameras = []
    for i, table in enumerate(data.get("camera", [])):
        if ("source" in table) == ("camera" in table):
            raise ClipadError(f"--config {path}: camera {i + 1} needs exactly one of source or camera")
        source = table.get("source", table.get("camera"))
        cameras.append(CameraConfig(name=table.get("name") or f"cam{i}", source=source,
                                    class_name=table.get("class", class_name), reconnect=table.get("reconnect", 0)))
    if not cameras:
        raise ClipadError(f"--config {path}: no [[camera]] declared")
    check_names(cameras, f"--config {path}")
    return cameras, dict(data.get("outputs", {})), dict(data.get("http", {}))
