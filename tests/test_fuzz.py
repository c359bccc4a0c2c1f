"""Fuzzing with a fixed budget (hypothesis, derandomized so CI is repeatable): image decoding and preprocessing,
manifest parsing and checkpoint loading either succeed or raise the one-line ClipadError; nothing else escapes and
nothing hangs (every example has a deadline)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from clipad.runtime.errors import ClipadError
from clipad.runtime.manifest import Manifest
from clipad.runtime.preprocess import load_image, prepare
from conftest import REPO

BUDGET = settings(max_examples=150, deadline=3000, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


VALID = {fmt: encoded(fmt) for fmt in ("PNG", "JPEG", "BMP", "TIFF", "WEBP")}


@st.composite
def damaged_images(draw) -> bytes:
    data = bytearray(VALID[draw(st.sampled_from(sorted(VALID)))])
    for _ in range(draw(st.integers(0, 8))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


@BUDGET
@given(st.one_of(damaged_images(), st.binary(max_size=2048)))
def test_image_files_decode_or_fail_cleanly(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("img") / "x.img"
    path.write_bytes(data)
    try:
        image = load_image(str(path))
    except ClipadError as exc:
        assert "\n" not in str(exc)
        return
    assert image.mode == "RGB" and image.width > 0 and image.height > 0
    assert prepare(image, 28).shape == (28, 28, 3)


@BUDGET
@given(hnp.arrays(dtype=st.sampled_from([np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_,
                                         np.complex64]),
                  shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=9)))
def test_arrays_preprocess_or_fail_cleanly(array):
    try:
        out = prepare(array, 14, "bgr")
    except ClipadError:
        return
    assert out.shape == (14, 14, 3) and out.dtype == np.uint8


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
                    | st.text(max_size=12), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
MANIFEST = json.loads((REPO / "tests" / "data" / "release-0.1.0-aaclip-tiny" / "manifest.json").read_text())


def paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, prefix + (i,))


ALL_PATHS = [p for p in paths(MANIFEST) if p]


@BUDGET
@given(st.lists(st.tuples(st.sampled_from(ALL_PATHS), JSON, st.booleans()), min_size=1, max_size=4),
       st.sampled_from([1, 2]))
def test_manifests_parse_or_fail_cleanly(edits, version):
    data = json.loads(json.dumps(MANIFEST))
    data["schema_version"] = version
    for path, value, delete in edits:
        node = data
        try:
            for key in path[:-1]:
                node = node[key]
            if delete and isinstance(node, dict):
                node.pop(path[-1], None)
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    try:
        Manifest.from_dict(data, "fuzz/manifest.json")
    except ClipadError as exc:
        assert "\n" not in str(exc)


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    import torch

    path = tmp_path_factory.mktemp("ckpt") / "c.pth"
    torch.save({"prompt_learner": {"ctx_pos": torch.zeros(1, 1, 4, 8)}}, path)
    return path.read_bytes()


@settings(max_examples=120, deadline=5000, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.data())
def test_checkpoints_load_or_fail_cleanly(tmp_path_factory, checkpoint_bytes, data):
    from clipad.export.checkpoints import load_crane
    from clipad.export.weights import torch_load

    raw = bytearray(checkpoint_bytes)
    for _ in range(data.draw(st.integers(0, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path_factory.mktemp("c") / "c.pth"
    path.write_bytes(bytes(raw))
    for load in (lambda p: torch_load(p, "--ckpt"), load_crane):
        try:
            load(str(path))
        except ClipadError as exc:
            assert "\n" not in str(exc)
