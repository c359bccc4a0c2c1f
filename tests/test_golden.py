"""Faithfulness: our torch models reproduce ../shared/golden (official AA-CLIP / Crane code on seeded weights)
within the tolerances of golden/tolerances.json, at ViT-L-14-336@518."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clipad.export.models.factory import build_detector
from clipad.runtime.preprocess import normalize, prepare
from conftest import CRANE_FIXTURES, DATA, GOLDEN, need_shared

TOL = json.loads((GOLDEN / "tolerances.json").read_text()) if GOLDEN.exists() else {}


def golden(name):
    return np.load(need_shared(GOLDEN / name))


def check(file, key, ours, ref, tol_key=None):
    tol = TOL[file][tol_key or key]
    atol = tol["rel_max"] * np.abs(ref).max() if isinstance(tol, dict) else tol
    err = float(np.abs(np.asarray(ours, np.float64) - ref).max())
    assert np.asarray(ours).shape == ref.shape, (key, np.asarray(ours).shape, ref.shape)
    assert err <= atol, f"{key}: max abs error {err:.3e} > {atol:.3e}"
    return err


def test_preprocessing_matches_golden_input():
    g = golden("aaclip_seed0.npz")
    batch = np.stack([prepare(DATA / f, 518) for f in g["file_names"]])
    check("aaclip_seed0.npz", "input", normalize(batch), g["input"])


def test_aaclip_prompts_and_tokens_match_golden():
    from open_clip.tokenizer import tokenize

    from clipad.export.prompts import aaclip_sentences, resolve_class

    g = golden("aaclip_seed0.npz")
    for prefix, cls in (("", "bottle"), ("brain_", "Brain")):
        real, domain = resolve_class(cls)
        assert real == str(g[prefix + "real_name"]) and domain == str(g[prefix + "domain"]).lower()
        normal, abnormal = aaclip_sentences(real)
        assert normal + abnormal == list(g[prefix + "text_sentences"])
        assert np.array_equal(tokenize(normal + abnormal).numpy(), g[prefix + "text_token_ids"])


def test_aaclip_head_only_matches_golden():
    """level maps → sum → blur (reflect) → bilinear (align corners) reproduces pixel_map at 1e-6, both domains."""
    from clipad.export.models.heads import BLUR_BY_DOMAIN, SeparableBlur, kornia_gaussian_taps, upsample

    g = golden("aaclip_seed0.npz")
    for prefix, domain in (("", "industrial"), ("brain_", "medical")):
        assert tuple(g[prefix + "blur_kernel_size"]) == (BLUR_BY_DOMAIN[domain][0],) * 2
        blur = SeparableBlur(kornia_gaussian_taps(*BLUR_BY_DOMAIN[domain]), 37, "reflect")
        level = torch.from_numpy(g[prefix + "level_maps_preblur"])           # [B, taps, 37, 37]
        assert np.abs(blur(level).numpy() - g[prefix + "level_maps_blurred"]).max() <= 1e-6
        pixel = upsample(blur(level.sum(1, keepdim=True)), 518, align_corners=True)
        assert np.abs(pixel[:, 0].numpy() - g[prefix + "pixel_map"]).max() <= 1e-6


def test_crane_head_only_matches_golden():
    """logits → softmax → bilinear (half-pixel) == prefilter map; scipy-style σ=4 symmetric filter == final map."""
    from clipad.export.models.heads import SeparableBlur, scipy_gaussian_taps, upsample

    g = golden("crane_seed0.npz")
    prob = torch.from_numpy(g["pixel_logits"]).softmax(-1)[..., 1].reshape(4, 1, 37, 37)
    assert np.abs(prob[:, 0].numpy() - g["prob_map_37"]).max() <= 1e-6
    pre = upsample(prob, 518, align_corners=False)
    assert np.abs(pre[0, 0].numpy() - g["anomaly_map_prefilter_img0"]).max() <= 1e-6
    smooth = SeparableBlur(scipy_gaussian_taps(4.0), 518, "symmetric")
    ours = smooth(torch.from_numpy(g["anomaly_map_prefilter_img0"])[None, None])[0, 0].numpy()
    assert np.abs(ours - g["anomaly_map"][0]).max() <= 1e-6
    # The border mode matters: torch-style reflect is measurably wrong (golden README: 6.6e-5).
    wrong = SeparableBlur(scipy_gaussian_taps(4.0), 518, "reflect")
    bad = wrong(torch.from_numpy(g["anomaly_map_prefilter_img0"])[None, None])[0, 0].numpy()
    assert np.abs(bad - g["anomaly_map"][0]).max() > 1e-5


@pytest.mark.slow
def test_random_init_reproduces_make_weights(golden_weights):
    from clipad.export import archs, weights

    ours = weights.random_state_dict(archs.build_clip("ViT-L-14-336", quick_gelu=False), seed=0)
    ref, fmt = weights.read_state_dict(str(golden_weights / "ViT-L-14-336px-random.pt"))
    assert fmt == "state-dict" and ours.keys() == ref.keys()
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key


def _run(built, inputs, trace):
    with torch.no_grad():
        maps, scores = built.module.core.forward_pixels(torch.from_numpy(inputs), trace)
    return maps.numpy(), scores.numpy()


@pytest.mark.slow
def test_aaclip_matches_golden(golden_weights):
    f = "aaclip_seed0.npz"
    g = golden(f)
    common = dict(arch="ViT-L-14-336", image_size=518, clip_weights=str(golden_weights / "ViT-L-14-336px-random.pt"),
                  ckpt=str(golden_weights / "aaclip_ckpt"))
    built = build_detector("aaclip", class_names=["bottle"], **common)
    assert built.domain == "industrial" and built.info["checkpoint_epoch"] == 15 and not built.info["relu"]
    check(f, "text_anchors", built.anchors[0].T.numpy(), g["text_anchors"])
    check(f, "pos_embed_ch8", built.module.core.vision.positions[:, ::8].numpy(), g["pos_embed_ch8"])
    trace = {}
    maps, scores = _run(built, g["input"], trace)
    check(f, "pixel_map", maps[:, 0], g["pixel_map"])
    check(f, "image_score_raw", scores[:, 0], g["image_score_raw"])
    check(f, "det_token", trace["det_token"].numpy(), g["det_token"])
    check(f, "level_maps_preblur", trace["level_maps_preblur"][:, :, 0].transpose(0, 1).numpy(),
          g["level_maps_preblur"])
    ti, pi = g["dbg_token_idx"], g["dbg_patch_idx"]
    check(f, "dbg_img0_ln_pre_out", trace["ln_pre_out"][0, ti].numpy(), g["dbg_img0_ln_pre_out"], "dbg_*")
    check(f, "dbg_img0_block1_out_pre_adapter", trace["block1_out_pre_adapter"][0, ti].numpy(),
          g["dbg_img0_block1_out_pre_adapter"], "dbg_*")
    for i in (1, 6, 12, 23, 24):
        check(f, f"block{i}", trace[f"block{i}_out"][0, ti].numpy(), g[f"dbg_img0_block{i}_out"], "dbg_*")
    seg = torch.stack(trace["seg_tokens"])[:, 0][:, pi].numpy()
    check(f, "dbg_img0_seg_tokens", seg, g["dbg_img0_seg_tokens"], "dbg_*")

    # Brain (medical head: 9/σ1.5 blur) shares the image forward; its head runs on the recorded taps.
    brain = build_detector("aaclip", class_names=["Brain"], **common)
    assert brain.domain == "medical"
    check(f, "brain_text_anchors", brain.anchors[0].T.numpy(), g["brain_text_anchors"])
    bmaps, bscores = brain.module.core.head(trace["seg_tokens"], trace["det_token"], btrace := {})
    check(f, "brain_pixel_map", bmaps[:, 0].numpy(), g["brain_pixel_map"])
    check(f, "brain_level_maps_blurred", brain.module.core.head.blur(btrace["level_maps_preblur"][:, :, 0]
                                                                    .transpose(0, 1)).numpy(),
          g["brain_level_maps_blurred"], "level_maps_blurred")
    check(f, "brain_image_score_raw", bscores[:, 0].numpy(), g["brain_image_score_raw"])
    check(f, "brain_level_maps_preblur", btrace["level_maps_preblur"][:, :, 0].transpose(0, 1).numpy(),
          g["brain_level_maps_preblur"], "level_maps_preblur")


@pytest.mark.slow
def test_crane_matches_golden(golden_weights):
    f = "crane_seed0.npz"
    g = golden(f)
    built = build_detector("crane", clip_weights=str(golden_weights / "ViT-L-14-336px-random.pt"),
                           ckpt=str(need_shared(CRANE_FIXTURES / "trained_on_visa_crane_epoch_5.pth")))
    check(f, "text_anchors", built.anchors[0].numpy(), g["text_anchors"])
    check(f, "pos_embed_ch8", built.module.core.vision.positions[:, ::8].numpy(), g["pos_embed_ch8"])
    trace = {}
    crane_text = {}
    from clipad.export import archs
    from clipad.export.checkpoints import load_crane
    from clipad.export.models import crane
    from clipad.export.weights import load_into, read_state_dict

    clip = archs.build_clip("ViT-L-14-336", quick_gelu=True)
    load_into(clip, read_state_dict(str(golden_weights / "ViT-L-14-336px-random.pt"))[0], "ViT-L-14-336", "golden")
    crane.text_anchors(clip, load_crane(str(CRANE_FIXTURES / "trained_on_visa_crane_epoch_5.pth")),
                       archs.arch_spec("ViT-L-14-336"), crane_text)
    check(f, "text_raw", crane_text["text_raw"].numpy(), g["text_raw"])
    assert np.array_equal(crane_text["prompt_token_ids"].numpy(), g["prompt_token_ids"])
    del clip

    maps, scores = _run(built, g["input"], trace)
    check(f, "anomaly_map", maps[:, 0], g["anomaly_map"])
    check(f, "anomaly_score", scores[:, 0], g["anomaly_score"])
    check(f, "image_feature_raw", trace["image_feature_raw"].numpy(), g["image_feature_raw"])
    check(f, "pixel_logits", trace["pixel_logits"][:, :, 0].numpy(), g["pixel_logits"])
    check(f, "prob_map_37", trace["prob_map_grid"][:, 0].numpy(), g["prob_map_37"])
    check(f, "pooled_feature", trace["pooled_feature"][:, 0].numpy(), g["pooled_feature"])
    check(f, "image_feature_fused", trace["image_feature_fused"][:, 0].numpy(), g["image_feature_fused"])
    check(f, "image_logits", trace["image_logits"][:, 0].numpy(), g["image_logits"])
    check(f, "anomaly_map_prefilter_img0", trace["anomaly_map_prefilter"][0, 0].numpy(),
          g["anomaly_map_prefilter_img0"])
    ti, pi = g["dbg_token_idx"], g["dbg_patch_idx"]
    check(f, "dbg_img0_ln_pre_out", trace["ln_pre_out"][0, ti].numpy(), g["dbg_img0_ln_pre_out"], "dbg_*")
    for ours, ref in (("H5", "H5"), ("H6", "H6"), ("Z6", "Z6"), ("H24", "H24"), ("Z24", "Z24")):
        check(f, ref, trace[ours][0, ti].numpy(), g[f"dbg_img0_{ref}"], "dbg_*")
    check(f, "dbg_img0_patch_feature_raw", trace["patch_feature_raw"][0, pi].numpy(),
          g["dbg_img0_patch_feature_raw"], "dbg_*")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["trained_on_mvtec_crane_epoch_5.pth", "trained_on_visa_crane_epoch_5.pth",
                                  "trained_on_mvtec_crane_epoch_3.pth"])
def test_real_crane_checkpoints_give_finite_maps(name):
    """Each real checkpoint loads on a seeded ViT-L-14-336 base; 224 px keeps the image forward short."""
    from tiny_fixtures import images

    built = build_detector("crane", random_init=True, seed=1, image_size=224,
                           ckpt=str(need_shared(CRANE_FIXTURES / name)))
    assert torch.allclose(built.anchors.norm(dim=-1), torch.ones(1, 2))
    with torch.no_grad():
        maps, scores = built.module(torch.from_numpy(images(2, 224)))
    assert maps.shape == (2, 1, 224, 224) and scores.shape == (2, 1)
    assert torch.isfinite(maps).all() and torch.isfinite(scores).all()
    assert ((maps > 0) & (maps < 1)).all() and ((scores > 0) & (scores < 1)).all()
    assert maps[0].std() > 0
