"""Shared fixtures: paths to ../shared, the golden seeded weights, and tiny-configuration weight/checkpoint files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CLIPAD_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"
DATA = SHARED / "data" / "magnetic_tile"
CRANE_FIXTURES = SHARED / "fixtures" / "crane"
CACHE = Path(os.environ.get("CLIPAD_CACHE", REPO / ".cache"))
# NVIDIA ModelOpt's own environment (scripts/setup_env.sh makes it on Linux x86-64): export-engine finds it here.
if (REPO / ".venv-modelopt" / "bin" / "python").exists():
    os.environ.setdefault("CLIPAD_MODELOPT_PYTHON", str(REPO / ".venv-modelopt" / "bin" / "python"))


def need_shared(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: the tests need ../shared beside the repository (or CLIPAD_SHARED)")
    return path


def golden_folder(tmp_path, g):
    """The golden images, linked under names that sort in golden order."""
    folder = tmp_path / "images"
    folder.mkdir()
    stems = []
    for i, name in enumerate(g["file_names"]):
        link = folder / f"{i}_{os.path.basename(str(name))}"
        os.symlink(need_shared(DATA / str(name)), link)
        stems.append(link.stem)
    return folder, stems


@pytest.fixture(scope="session")
def golden_weights() -> Path:
    """The seeded ViT-L-14-336 base weights + AA-CLIP adapters, regenerated with golden/make_weights.py (~15 s)."""
    out = CACHE / "golden-weights-seed0"
    done = out / "ViT-L-14-336px-random.pt"
    if not (done.exists() and (out / "aaclip_ckpt" / "image_adapter_15.pth").exists()):
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(need_shared(GOLDEN / "make_weights.py")), str(out)], check=True,
                       stdout=subprocess.DEVNULL)
    return out


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """Tiny-configuration base weights in every supported format, and official-format AA-CLIP / Crane checkpoints."""
    from tiny_fixtures import make_tiny_files

    return make_tiny_files(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def normals(tmp_path_factory):
    """40 generated normal images: the tiny exports' calibration / decision-gate set for the low precisions."""
    from clipad.calibration.samples import write_samples

    folder = tmp_path_factory.mktemp("normals")
    write_samples(str(folder), count=40, seed=5)
    return folder


@pytest.fixture(scope="session")
def calib_dir(tmp_path_factory):
    """12 generated sample images (INT8 calibration set for the tiny models)."""
    from clipad.calibration.samples import write_samples

    folder = tmp_path_factory.mktemp("calib")
    write_samples(str(folder), count=12, seed=3)
    return folder


@pytest.fixture
def openvino_without_bf16(monkeypatch):
    """OpenVINO as on a CPU without BF16: the CPU's OPTIMIZATION_CAPABILITIES lose "BF16" (a fake capability list)."""
    import openvino

    class NoBF16Core(openvino.Core):
        def get_property(self, device, name):
            value = super().get_property(device, name)
            return [c for c in value if c != "BF16"] if name == "OPTIMIZATION_CAPABILITIES" else value

    monkeypatch.setattr(openvino, "Core", NoBF16Core)
