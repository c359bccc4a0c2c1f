"""The few-shot graph's math in numpy (``clipad.export.fewshot_graph`` documents it): what tests hold the ONNX graph
to, from the recipe the manifest records. Resize and blur are written as the matrices they are (bilinear weights,
Gaussian taps with numpy.pad's border index), so the reference shares no code with the torch head it checks."""
from __future__ import annotations

import numpy as np


def resize_matrix(size_in: int, size_out: int, align_corners: bool) -> np.ndarray:
    """[out, in] weights of torch's bilinear interpolate along one axis."""
    dst = np.arange(size_out, dtype=np.float64)
    if align_corners:
        src = dst * ((size_in - 1) / (size_out - 1) if size_out > 1 else 0.0)
    else:
        src = np.maximum((dst + 0.5) * (size_in / size_out) - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(int), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac = src - low
    w = np.zeros((size_out, size_in))
    np.add.at(w, (np.arange(size_out), low), 1.0 - frac)
    np.add.at(w, (np.arange(size_out), high), frac)
    return w


def blur_matrix(size: int, taps: list[float], border: str) -> np.ndarray:
    """[size, size] weights of a 1-D Gaussian with numpy.pad's border ('reflect' or 'symmetric')."""
    taps = np.asarray(taps, np.float64)
    radius = len(taps) // 2
    index = np.pad(np.arange(size), radius, mode=border)
    w = np.zeros((size, size))
    for i in range(size):
        np.add.at(w[i], index[i:i + len(taps)], taps)
    return w


def spatial(grid_map: np.ndarray, recipe: dict) -> np.ndarray:
    """[B, g, g] per-patch values → [B, S, S] as the model's head does it."""
    g, s = recipe["grid"], recipe["image_size"]
    resize = resize_matrix(g, s, recipe["align_corners"])
    x = grid_map.astype(np.float64)
    if recipe["order"] == "blur_then_resize":
        blur = blur_matrix(g, recipe["blur_taps"], recipe["border"])
        return resize @ (blur @ x @ blur.T) @ resize.T
    x = resize @ x @ resize.T
    if recipe["blur_taps"]:
        blur = blur_matrix(s, recipe["blur_taps"], recipe["border"])
        x = blur @ x @ blur.T
    return x


def zero_shot_probability(anomaly_map: np.ndarray, recipe: dict) -> np.ndarray:
    rule = recipe["zero_shot_probability"]
    if rule["rule"] == "identity":
        return anomaly_map.astype(np.float64)
    t = rule["taps"]
    return 1.0 / (1.0 + np.exp(-(2.0 * anomaly_map.astype(np.float64) - t) / t))


def fewshot_grid(features: np.ndarray, memory: np.ndarray) -> np.ndarray:
    """[B, T, P, C] features, [T, M, C] memory → [B, P]: 1 − max cosine over the memory, averaged over taps."""
    f, m = features.astype(np.float64), memory.astype(np.float64)
    similarity = np.einsum("btpc,tmc->btpm", f, m)
    return (1.0 - similarity.max(axis=-1)).mean(axis=1)


def fewshot_outputs(features, memory, anomaly_map, image_score, recipe: dict):
    """(fewshot_map [B, S, S], fused_map [B, S, S], fused_score [B]) as float32."""
    g = recipe["grid"]
    distance = fewshot_grid(features, memory)
    fewshot = spatial(distance.reshape(-1, g, g), recipe)
    fused_map = 0.5 * (zero_shot_probability(anomaly_map, recipe) + 0.5 * fewshot)
    fused_score = 0.5 * (np.asarray(image_score, np.float64) + 0.5 * fewshot.reshape(len(fewshot), -1).max(axis=1))
    return tuple(a.astype(np.float32) for a in (fewshot, fused_map, fused_score))
