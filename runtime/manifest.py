"""The versioned ``manifest.json`` sidecar: the only thing the runtime reads about a model.

Written by ``export-engine`` next to the model files (nothing is ever prepended to an ONNX or engine file, so
trtexec / DeepStream can load them as they are). Hashes tie the manifest to the exact model files.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

from .errors import ClipadError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
REQUIRED = ("schema_version", "model", "input", "outputs", "files")


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str, data: Any) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read(model_dir: str) -> dict:
    """Load and validate ``model_dir/manifest.json`` (schema only; see ``verify_file`` for hashes)."""
    path = os.path.join(model_dir, MANIFEST_NAME)
    if not os.path.isdir(model_dir):
        raise ClipadError(f"--model {model_dir}: no such model directory")
    if not os.path.isfile(path):
        raise ClipadError(f"--model {model_dir}: no {MANIFEST_NAME} (not a directory written by export-engine)")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ClipadError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(data, dict) or k not in data]
        raise ClipadError(f"{path}: not a clipad manifest (missing {', '.join(missing)})")
    version = data["schema_version"]
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ClipadError(f"{path}: schema_version {version} is newer than this runtime supports "
                          f"({SCHEMA_VERSION}); upgrade clipad-edge")
    return data


def verify_file(model_dir: str, manifest: dict, name: str) -> str:
    """Path of a model file listed in the manifest, after checking its size and sha256."""
    entry = manifest["files"].get(name)
    if entry is None:
        raise ClipadError(f"{model_dir}: manifest lists no file {name!r} (has: {', '.join(manifest['files'])})")
    path = os.path.join(model_dir, name)
    if not os.path.isfile(path):
        raise ClipadError(f"{path}: listed in the manifest but missing")
    if os.path.getsize(path) != entry.get("bytes", os.path.getsize(path)) or sha256_file(path) != entry["sha256"]:
        raise ClipadError(f"{path}: sha256 does not match the manifest (file changed or truncated); re-export")
    return path
