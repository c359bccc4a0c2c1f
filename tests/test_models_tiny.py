"""Every model kind and every weight format, on a tiny configuration of the same code (seconds on a CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipad.export.models.factory import build_detector
from clipad.export.reference import TorchBackend
from tiny_fixtures import TINY, images

SIZE = 70  # 5x5 grid from a 4x4 base table: exercises the positional resize


def build(kind, files, fmt="state_dict", **kw):
    ckpt = {"aaclip": files["aaclip"], "crane": files["crane"]}.get(kind)
    names = kw.pop("class_names", None) or (["bottle", "screw"] if kind != "crane" else None)
    return build_detector(kind, arch=TINY, image_size=SIZE, clip_weights=str(files[fmt]),
                          ckpt=str(ckpt) if ckpt else None, class_names=names, **kw)


@pytest.mark.parametrize("fmt", ["state_dict", "open_clip", "safetensors", "torchscript"])
def test_every_weight_format_loads_the_same_values(tiny_files, fmt):
    built = build("clip", tiny_files, fmt)
    ref = tiny_files["state"]["visual.conv1.weight"].half().float()  # the plain file stores float16
    ours = built.module.core.vision.visual.conv1.weight
    tol = 1e-3 if fmt != "state_dict" else 0  # other formats hold the float32 values
    assert torch.allclose(ours, ref, atol=tol) and built.info["weights_format"] in (
        "state-dict", "safetensors", "openai-torchscript")


@pytest.mark.parametrize("kind", ["aaclip", "crane", "clip"])
def test_kind_outputs_shapes_and_batch_independence(tiny_files, kind):
    built = build(kind, tiny_files)
    k = 1 if kind == "crane" else 2
    x = images(3, SIZE)
    with torch.no_grad():
        maps, scores = built.module(torch.from_numpy(x))
        single, single_score = built.module(torch.from_numpy(x[1:2]))
    assert maps.shape == (3, k, SIZE, SIZE) and scores.shape == (3, k)
    assert maps.dtype == torch.float32 and torch.isfinite(maps).all() and torch.isfinite(scores).all()
    # An image's result does not depend on the rest of the batch (AA-CLIP's training code mixed batches: §2.9).
    assert torch.allclose(maps[1:2], single, atol=1e-5) and torch.allclose(scores[1:2], single_score, atol=1e-6)
    # Different images give different maps.
    assert (maps[0] - maps[2]).abs().max() > 1e-6
    assert torch.allclose(built.anchors.norm(dim=-1), torch.ones(k, 2), atol=1e-5)


def test_aaclip_specifics(tiny_files):
    built = build("aaclip", tiny_files)
    assert built.info["checkpoint_epoch"] == 7  # latest epoch by default
    assert build("aaclip", tiny_files, epoch=3).info["checkpoint_epoch"] == 3
    assert built.info["activation"] == "gelu" and built.domain == "industrial"
    assert built.prompt_names == ["dark bottle", "screw"]
    head = built.module.core.head
    assert head.blur.taps_h.numel() == 7
    medical = build("aaclip", tiny_files, class_names=["Brain"])
    assert medical.domain == "medical" and medical.module.core.head.blur.taps_h.numel() == 9
    # An image score is (d·t_a + 1)/2 with ‖d‖ ≤ 1, so it lies in [0, 1].
    with torch.no_grad():
        _, scores = built.module(torch.from_numpy(images(2, SIZE)))
    assert ((scores >= 0) & (scores <= 1)).all()


def test_crane_specifics(tiny_files):
    built = build("crane", tiny_files)
    assert built.info["activation"] == "quick_gelu" and built.class_names == ["object"]
    vision = built.module.core.vision
    assert vision.first_eattn == 2  # last 3 of 4 blocks get E-Attn (19 of 24 for ViT-L)
    with torch.no_grad():
        maps, scores = built.module(torch.from_numpy(images(2, SIZE)))
    assert ((maps > 0) & (maps < 1)).all() and ((scores > 0) & (scores < 1)).all()


def test_positional_tables_differ_by_model(tiny_files):
    aa = build("aaclip", tiny_files).module.core.vision.positions
    cr = build("crane", tiny_files).module.core.vision.positions
    assert aa.shape == cr.shape == (1 + 25, 64)
    assert torch.equal(aa[0], cr[0]) and (aa[1:] - cr[1:]).abs().max() > 1e-4  # bicubic-AA vs bilinear


def test_reference_pipeline_any_image_mode(tiny_files, tmp_path):
    from PIL import Image

    ref = TorchBackend(build("clip", tiny_files))
    rgb = np.random.default_rng(1).integers(0, 256, (40, 90, 3), dtype=np.uint8)
    paths = []
    for mode in ("RGB", "L", "RGBA"):
        p = tmp_path / f"im_{mode}.png"
        Image.fromarray(rgb).convert(mode).save(p)
        paths.append(str(p))
    outs = ref.predict(paths + [rgb])
    assert len(outs) == 4
    for out in outs:
        assert out.anomaly_map.shape == (2, SIZE, SIZE) and out.image_score.shape == (2,)
        assert np.allclose(out.map_max, out.anomaly_map.reshape(2, -1).max(1))
    # RGB file == RGB array; RGBA (opaque) == RGB; grey differs.
    assert np.array_equal(outs[0].anomaly_map, outs[3].anomaly_map)
    assert np.array_equal(outs[0].anomaly_map, outs[2].anomaly_map)
    assert not np.array_equal(outs[0].anomaly_map, outs[1].anomaly_map)
