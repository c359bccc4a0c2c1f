"""The few-shot graph (``fewshot.onnx``): a normal-patch memory compared with an image's patch features, made into a
map with the model head's own resize and smoothing, and fused with the zero-shot outputs.

Inputs: patch_features [B, T, P, C] (the model's ``--memory-features`` output), memory [T, M, C] (unit patch
features of normal images, ``edge-calibrate --memory``), anomaly_map [B, S, S] and image_score [B] of one class.
Outputs: fewshot_map [B, S, S], fused_map [B, S, S], fused_score [B].

few-shot map: per patch and tap 1 − max cosine similarity to the memory (PatchCore's nearest neighbour, AnomalyDINO's
and WinCLIP+'s distance), averaged over the taps, in [0, 2]; then the head's ``to_image``. Fusion (WinCLIP+, as
anomalib implements it): both parts in [0, 1] units — the zero-shot map as an anomaly probability
(``head.map_probability``), the few-shot map halved (WinCLIP's ½(1 − cos)) — fused map = their mean, fused score =
mean of the zero-shot image score and the halved few-shot map's maximum. The memory is an input, so one graph serves
every memory (and every class). ``clipad.runtime.fewshot_reference`` computes the same in numpy.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

from clipad.runtime.errors import ClipadError

from .models.heads import grid_to_square

log = logging.getLogger("clipad")
FILE = "fewshot.onnx"
INPUTS = ("patch_features", "memory", "anomaly_map", "image_score")
OUTPUTS = ("fewshot_map", "fused_map", "fused_score")


class FewShotFusion(torch.nn.Module):
    def __init__(self, head: torch.nn.Module, grid: int):
        super().__init__()
        self.head, self.grid = head, grid

    def forward(self, patch_features: torch.Tensor, memory: torch.Tensor, anomaly_map: torch.Tensor,
                image_score: torch.Tensor):
        # one tap at a time (T is fixed at export): the [B, P, M] similarities of one tap are the largest tensor, a
        # quarter of all taps' at once for AA-CLIP (ONNX Runtime and OpenVINO keep such intermediates whole)
        taps = patch_features.shape[1]
        nearest = [(patch_features[:, t] @ memory[t].transpose(0, 1)).amax(dim=-1) for t in range(taps)]
        distance = 1.0 - torch.stack(nearest, dim=1).mean(dim=1)                 # [B, P]
        fewshot = self.head.to_image(grid_to_square(distance.unsqueeze(-1), self.grid))[:, 0]   # [B, S, S]
        fused_map = 0.5 * (self.head.map_probability(anomaly_map) + 0.5 * fewshot)
        fused_score = 0.5 * (image_score + 0.5 * fewshot.flatten(1).amax(dim=1))
        return fewshot, fused_map, fused_score


def recipe(head: torch.nn.Module, grid: int, kind: str) -> dict:
    """What the graph does, in numbers, for the manifest and the numpy reference."""
    from .models.heads import AACLIPHead

    if isinstance(head, AACLIPHead):
        return {"grid": grid, "image_size": head.image_size, "order": "blur_then_resize", "align_corners": True,
                "blur_taps": head.blur.taps_w.flatten().tolist(), "border": "reflect",
                "zero_shot_probability": {"rule": "sigmoid_mean_tap_logit", "taps": head.taps},
                "fusion": "winclip_plus", "kind": kind}
    smooth = getattr(head, "smooth", None)
    return {"grid": grid, "image_size": head.image_size, "order": "resize_then_blur", "align_corners": False,
            "blur_taps": smooth.taps_w.flatten().tolist() if smooth is not None else [], "border": "symmetric",
            "zero_shot_probability": {"rule": "identity"}, "fusion": "winclip_plus", "kind": kind}


def export_fewshot(head: torch.nn.Module, grid: int, taps: int, channels: int, path: str) -> None:
    """Write the few-shot graph, batch and memory size dynamic, opset and TensorRT rules as the model's."""
    from .onnx_export import OPSET, check_graph

    module = FewShotFusion(head, grid).eval()
    s = head.image_size
    example = (torch.zeros(2, taps, grid * grid, channels), torch.zeros(taps, 3, channels), torch.zeros(2, s, s),
               torch.zeros(2))
    batch, rows = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("memory", min=1, max=1 << 24)
    dynamic = ({0: batch}, {1: rows}, {0: batch}, {0: batch})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            with torch.no_grad():
                program = torch.onnx.export(module, example, dynamo=True, opset_version=OPSET,
                                            input_names=list(INPUTS), output_names=list(OUTPUTS),
                                            dynamic_shapes=dynamic, optimize=True, verbose=False)
        except Exception as exc:
            raise ClipadError(f"few-shot graph export failed: {str(exc).strip().splitlines()[0][:300]}") from exc
    program.save(path, external_data=False)
    check_graph(path)


def check_against_reference(path: str, recipe_: dict, taps: int, channels: int, seed: int = 0) -> float:
    """The exported graph vs the numpy reference on seeded unit features; returns the largest few-shot map
    difference (raises above 1e-5)."""
    import onnxruntime as ort

    from clipad.runtime.fewshot_reference import fewshot_outputs

    rng = np.random.default_rng(seed)
    p, s = recipe_["grid"] ** 2, recipe_["image_size"]

    def unit(*shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    features, memory = unit(2, taps, p, channels), unit(taps, 2 * p, channels)
    memory[:, :p] = features[0]       # image 0 is in the memory: its few-shot map is 0
    amap = rng.uniform(0, 1, (2, s, s)).astype(np.float32)
    score = rng.uniform(0, 1, 2).astype(np.float32)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(list(OUTPUTS), dict(zip(INPUTS, (features, memory, amap, score))))
    want = fewshot_outputs(features, memory, amap, score, recipe_)
    error = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
    if error > 1e-5:
        raise ClipadError(f"internal error: the few-shot graph differs from its numpy reference by {error:.2e}")
    return error
