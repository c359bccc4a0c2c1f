"""The versioned ``manifest.json`` sidecar, as one typed schema: the only thing the runtime reads about a model.

Written by ``export-engine`` next to the model files (nothing is ever prepended to an ONNX or engine file, so
trtexec / DeepStream load them as they are); hashes tie it to the exact files. Readers go through ``Manifest.read``;
every writer of an existing export goes through ``Manifest.update(dir, change)``, which takes the folder's lock,
re-reads, applies the change and writes atomically (keeping the file's mode), so two commands working on one export
never lose each other's changes.

Versions: 7 is current. 1 (clipad-edge 0.1.0) to 6 are read and upgraded in memory (``manifest_upgrade``); the next
write stores version 7. A newer version than this runtime knows is refused with a one-line error (so a schema-7
manifest read by an older clipad-edge says "newer than this clipad-edge supports").
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from . import precisions, schema
from .atomic import write_json_atomic
from .compare import GateReport
from .decision import RULES
from .errors import ClipadError
from .filelock import FileLock, pause_point
from .manifest_calibration import Calibration, ClassCalibration, precision_name

__all__ = ["Calibration", "ClassCalibration", "Manifest", "SCHEMA_VERSION", "MANIFEST_NAME", "check_writable",
           "file_entry", "lock", "sha256_file"]

SCHEMA_VERSION = 7
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".manifest.json.lock"
LOCK_TIMEOUT_S = 120.0
T = TypeVar("T")


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _plain_file_name(name: str, where: str) -> None:
    """Model files live in the model folder itself: a path, '..' or an absolute name is refused."""
    if not name or name in (".", "..") or os.path.basename(name) != name or "\\" in name or "\0" in name:
        raise schema.SchemaError(f"{where}: {name!r} is not a plain file name inside the model folder")


@dataclass
class BatchRange:
    min: int
    max: int
    opt: int

    def validate(self, where: str) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise schema.SchemaError(f"{where}: need 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}")

    @property
    def fixed(self) -> bool:
        return self.min == self.max


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[int | str]      # "batch" for a dynamic batch dimension


@dataclass
class InputSpec(TensorSpec):
    layout: str = "NHWC"
    color: str = "RGB"
    host_preprocessing: str = ""
    in_graph: dict = field(default_factory=dict)


@dataclass
class ModelInfo:
    kind: str
    arch: str
    image_size: int
    class_names: list[str]
    decision_score: str                           # the decision-score rule (runtime.decision.RULES): the one source
    prompt_names: list[str] = field(default_factory=list)
    domain: str | None = None
    anchor_sha256: str = ""
    random_init: bool = False
    details: dict = field(default_factory=dict)   # model-kind provenance (weights format, checkpoint epoch, blur …)

    def validate(self, where: str) -> None:
        if not self.class_names:
            raise schema.SchemaError(f"{where}.class_names: empty")
        if len(set(self.class_names)) != len(self.class_names):
            raise schema.SchemaError(f"{where}.class_names: a name appears twice ({self.class_names})")
        if self.decision_score not in RULES:
            raise schema.SchemaError(f"{where}.decision_score: unknown rule {self.decision_score!r} (known: "
                                     f"{', '.join(RULES)}); upgrade clipad-edge or re-export")


@dataclass
class FileEntry:
    sha256: str
    bytes: int
    precision: str
    format: str = "onnx"
    opset: int | None = None

    def validate(self, where: str) -> None:
        precision_name(self.precision, f"{where}.precision")


@dataclass
class EngineTarget:
    compute_capability: str
    gpu_name: str | None = None
    aot: bool = False


@dataclass
class EngineEntry:
    file: str
    precision: str
    flavor: str
    trt_version: str
    target: EngineTarget
    sha256: str
    bytes: int
    batch: BatchRange
    onnx: str = "model.onnx"
    onnx_sha256: str = ""
    version_compatible: bool = False
    build_seconds: float | None = None
    built: str | None = None
    build_command: str | None = None

    def validate(self, where: str) -> None:
        _plain_file_name(self.file, f"{where}.file")
        precision_name(self.precision, f"{where}.precision")


@dataclass
class PrecisionReport:
    gate: GateReport
    conversion: dict = field(default_factory=dict)   # what the converter did (tool, kept-float nodes, calibration …)


@dataclass
class Manifest:
    schema_version: int
    model: ModelInfo
    input: InputSpec
    outputs: list[TensorSpec]
    batch: BatchRange
    files: dict[str, FileEntry]
    sources: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)
    parity: GateReport | None = None
    precisions: dict[str, PrecisionReport] = field(default_factory=dict)
    calibrations: list[Calibration] = field(default_factory=list)
    engines: list[EngineEntry] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def validate(self, where: str) -> None:
        for name in self.files:
            _plain_file_name(name, f"{where}.files")
        if precisions.REFERENCE.file not in self.files:
            raise schema.SchemaError(f"{where}.files: no {precisions.REFERENCE.file} entry")
        for name in self.precisions:
            precision_name(name, f"{where}.precisions")
        s, k = self.model.image_size, len(self.model.class_names)
        shapes = {o.name: o.shape[1:] for o in self.outputs}
        expected = {"anomaly_map": [k, s, s], "image_score": [k]}
        for name, shape in expected.items():
            if name in shapes and shapes[name] != shape:
                raise schema.SchemaError(f"{where}.outputs.{name}: shape [batch, {', '.join(map(str, shapes[name]))}]"
                                         f" does not fit {k} class name(s) {self.model.class_names} at {s} px "
                                         f"(expected [batch, {', '.join(map(str, shape))}])")
        for i, calibration in enumerate(self.calibrations):
            for name, cal in calibration.classes.items():
                at = f"{where}.calibrations[{i}].classes.{name}"
                if name not in self.model.class_names:
                    raise schema.SchemaError(f"{at}: not a class of this model ({', '.join(self.model.class_names)})")
                cal.check_rule(self.model.decision_score, at)

    # ---- reading and writing ---------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data, where: str = MANIFEST_NAME) -> "Manifest":
        from .manifest_upgrade import upgrade

        if not isinstance(data, dict) or "schema_version" not in data:
            raise ClipadError(f"{where}: not a clipad manifest (no schema_version)")
        version = data["schema_version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ClipadError(f"{where}: schema_version {version!r} is not a version number")
        if version > SCHEMA_VERSION:
            raise ClipadError(f"{where}: schema_version {version} is newer than this clipad-edge supports "
                              f"({SCHEMA_VERSION}); upgrade clipad-edge")
        try:
            return schema.load(cls, upgrade(data, version), "manifest")
        except schema.SchemaError as exc:
            raise ClipadError(f"{where}: invalid manifest: {exc}; re-export with export-engine (or re-run "
                              f"edge-calibrate for a calibration)") from None

    def to_dict(self) -> dict:
        out = schema.dump(self)
        out["schema_version"] = SCHEMA_VERSION
        return out

    @classmethod
    def read(cls, model_dir: str) -> "Manifest":
        """``model_dir/manifest.json``, validated (schema only; ``verify_file`` checks hashes)."""
        path = os.path.join(model_dir, MANIFEST_NAME)
        if not os.path.isdir(model_dir):
            raise ClipadError(f"--model {model_dir}: no such model directory")
        if not os.access(model_dir, os.R_OK | os.X_OK):
            raise ClipadError(f"--model {model_dir}: permission denied (the folder is not readable by this user)")
        if not os.path.isfile(path):
            raise ClipadError(f"--model {model_dir}: no {MANIFEST_NAME} (not a directory written by export-engine)")
        try:
            with open(path, "rb") as fh:
                data = json.loads(fh.read())
        except (OSError, ValueError) as exc:
            raise ClipadError(f"{path}: unreadable manifest ({exc})") from None
        return cls.from_dict(data, path)

    def write(self, model_dir: str) -> str:
        """Atomically (temp file + rename) replace ``model_dir/manifest.json``, keeping an existing file's mode. Used
        for a new export's folder; an existing export is changed through ``update``."""
        path = os.path.join(model_dir, MANIFEST_NAME)
        try:
            mode = os.stat(path).st_mode & 0o7777
        except OSError:
            mode = None
        return write_json_atomic(path, self.to_dict(), mode=mode)

    @classmethod
    def update(cls, model_dir: str, change: Callable[["Manifest"], T], files: dict[str, str] | None = None,
               timeout: float = LOCK_TIMEOUT_S) -> T:
        """Under the folder's lock: read the manifest as it is now, move ``files`` (name -> a finished file beside
        the folder, e.g. in a temp folder inside it) into place, ``change(manifest)`` it and write it atomically.
        If anything fails, the files it replaced are put back: model files change only together with the manifest
        that lists them. Returns what ``change`` returns. Work that takes long is done before, outside the lock."""
        pause_point("before-manifest-update")
        with lock(model_dir, timeout=timeout):
            manifest = cls.read(model_dir)
            moved: list[tuple[str, str | None]] = []   # (installed path, backup of what it replaced)
            try:
                for name, ready in (files or {}).items():
                    target = os.path.join(model_dir, name)
                    backup = None
                    if os.path.exists(target):
                        backup = f"{target}.replaced-{os.getpid()}"
                        os.replace(target, backup)
                    moved.append((target, backup))
                    os.replace(ready, target)
                result = change(manifest)
                manifest.write(model_dir)
            except BaseException:
                for target, backup in reversed(moved):
                    try:
                        if backup is not None:
                            os.replace(backup, target)
                        elif os.path.exists(target):
                            os.remove(target)
                    except OSError:
                        pass
                raise
            for _, backup in moved:
                if backup is not None:
                    try:
                        os.remove(backup)
                    except OSError:
                        pass
        return result

    # ---- helpers every consumer needs ------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    def calibration(self, precision: str, backend: str) -> tuple[Calibration | None, str | None]:
        """The calibration for this precision (this backend's if there is one), else another precision's with a
        warning text, else (None, None)."""
        same = [c for c in self.calibrations if c.precision == precision]
        exact = [c for c in same if c.backend == backend]
        if exact or same:
            return (exact or same)[0], None
        if self.calibrations:
            other = self.calibrations[0]
            return other, (f"no calibration for {precision}; using the {other.precision} thresholds (calibrated on "
                           f"{other.backend}): run edge-calibrate --precision {precision} for this precision's own")
        return None, None

    def set_class_calibration(self, precision: str, backend: str, class_name: str, cal: ClassCalibration) -> None:
        """Add or replace one class's thresholds for this precision and backend; other classes keep theirs."""
        existing = next((c for c in self.calibrations if (c.precision, c.backend) == (precision, backend)), None)
        if existing is None:
            existing = Calibration(precision=precision, backend=backend, classes={})
            self.calibrations.append(existing)
        existing.classes[class_name] = cal

    def verify_file(self, model_dir: str, name: str) -> str:
        """Path of a model file listed in the manifest, after checking its size and sha256."""
        entry = self.files.get(name)
        if entry is None:
            raise ClipadError(f"{model_dir}: manifest lists no file {name!r} (has: {', '.join(self.files)})")
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            raise ClipadError(f"{path}: listed in the manifest but missing")
        if os.path.getsize(path) != entry.bytes or sha256_file(path) != entry.sha256:
            raise ClipadError(f"{path}: sha256 does not match the manifest (file changed or truncated); re-export")
        return path

    def owned_files(self) -> list[str]:
        """The names of everything in the folder that the export owns: manifest, lock, model files, engines."""
        return [MANIFEST_NAME, LOCK_NAME, *self.files, *(e.file for e in self.engines), *self.memory_files()]

    def memory_files(self) -> list[str]:
        """The few-shot memories the calibrations use (``edge-calibrate --memory``)."""
        return sorted({cal.memory["file"] for c in self.calibrations for cal in c.classes.values() if cal.memory})


def lock(model_dir: str, timeout: float = LOCK_TIMEOUT_S, shared: bool = False) -> FileLock:
    """The lock of an export folder's manifest (every writer holds it while it reads, changes and writes)."""
    return FileLock(os.path.join(model_dir, LOCK_NAME), f"{os.path.join(model_dir, MANIFEST_NAME)}", timeout, shared)


def check_writable(model_dir: str) -> Manifest:
    """The manifest of an export this user can change (checked before long work, so it never ends in a lost
    result)."""
    manifest = Manifest.read(model_dir)
    if not os.access(model_dir, os.W_OK):
        raise ClipadError(f"--model {model_dir}: the model folder is read-only for this user; its manifest cannot be "
                          f"updated")
    return manifest


def file_entry(path: str, precision: str, opset: int | None) -> FileEntry:
    return FileEntry(sha256=sha256_file(path), bytes=os.path.getsize(path), precision=precision, opset=opset)
