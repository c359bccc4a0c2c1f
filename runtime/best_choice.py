"""``--backend best``: the fastest (backend, precision) whose export gate passed, as ``edge-bench --save-choice``
measured it on this machine.

The choice lives beside the model in ``bench-choices.json``, one entry per machine (CPU model, its low-precision
flags, core count, GPU and compute capability), with the sha256 of the file that ran: a re-export, or another box
that got a copy of the folder, does not silently inherit it.
"""
from __future__ import annotations

import json
import logging
import os

from . import precisions
from .atomic import write_json_atomic
from .errors import ClipadError
from .manifest import Manifest, lock

log = logging.getLogger("clipad")
BEST = "best"
CHOICES_FILE = "bench-choices.json"
VERSION = 1


def machine() -> dict:
    """What a measured speed depends on: CPU model, low-precision flags, cores, GPU."""
    from .backends import cuda_buffers
    from .platform_info import cpu_info

    cpu = cpu_info()
    gpu = cuda_buffers.gpu_info()
    return {"cpu": cpu["model"], "cpu_flags": sorted(cpu["flags"]), "cores": os.cpu_count(),
            "gpu": None if gpu is None else f"{gpu['name']} (SM {gpu['compute_capability']})"}


def machine_key(info: dict) -> str:
    return f"{info['cpu']} [{' '.join(info['cpu_flags'])}] x{info['cores']}; gpu {info['gpu'] or 'none'}"


def _read(path: str) -> dict:
    if not os.path.isfile(path):
        return {"version": VERSION, "choices": {}}
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ClipadError(f"{path}: unreadable ({exc}); delete it and run edge-bench --save-choice again") from None
    if not isinstance(data, dict) or not isinstance(data.get("choices"), dict):
        raise ClipadError(f"{path}: not a clipad choices file; delete it and run edge-bench --save-choice again")
    return data


def save(model_dir: str, manifest: Manifest, row: dict, env: dict) -> dict:
    """Record ``row`` (an edge-bench row that ran and passed its gate) as this machine's choice; returns the entry."""
    wanted = precisions.get(row["runs"] or row["precision"])
    entry = {"backend": row["backend"], "precision": row["precision"], "runs": row["runs"],
             "p50_ms": row["p50_ms"], "batch": row["batch"], "gate": row["gate"] or "reference",
             "file": wanted.file, "sha256": manifest.files[wanted.file].sha256 if wanted.file in manifest.files
             else None, "measured": env.get("measured"), "clipad_edge": env.get("versions", {}).get("clipad-edge")}
    path = os.path.join(model_dir, CHOICES_FILE)
    info = machine()
    with lock(model_dir):   # the export's lock: two benches at once each keep their machine's entry
        data = _read(path)
        data["choices"][machine_key(info)] = {**entry, "machine": info}
        write_json_atomic(path, data)
    return entry


def load(model_dir: str, manifest: Manifest) -> dict:
    """This machine's choice, checked against the current files; a one-line error says how to make one."""
    path = os.path.join(model_dir, CHOICES_FILE)
    remedy = f"run: edge-bench --model {model_dir} --save-choice"
    if not os.path.isfile(path):
        raise ClipadError(f"--backend best: no {CHOICES_FILE} in {model_dir}; {remedy}")
    key = machine_key(machine())
    entry = _read(path)["choices"].get(key)
    if entry is None:
        raise ClipadError(f"--backend best: {CHOICES_FILE} has no choice measured on this machine ({key}); {remedy}")
    if not isinstance(entry, dict) or not isinstance(entry.get("backend"), str) \
            or entry.get("precision") not in precisions.PRECISIONS:
        raise ClipadError(f"--backend best: the entry for this machine in {path} is damaged; {remedy}")
    current = manifest.files.get(entry.get("file"))
    if entry.get("sha256") and (current is None or current.sha256 != entry["sha256"]):
        raise ClipadError(f"--backend best: the choice was measured on another {entry.get('file')} than this "
                          f"export's (re-exported since?); {remedy}")
    return entry
