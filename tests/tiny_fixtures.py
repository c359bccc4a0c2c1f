"""Writers for tiny-configuration files in the official formats (the same code paths as the real sizes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clipad.export import archs, weights

TINY = "tiny-vit"


def _sd():
    clip = archs.build_clip(TINY, quick_gelu=True)
    return weights.random_state_dict(clip, seed=3)


def _draw(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * shape[-1] ** -0.5


def write_aaclip_ckpt(folder: Path, width=64, text_width=48, embed=32, n_layer=1, n_text=1, relu=False,
                      epochs=(3, 7)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = {f"{i}.fc.0.weight": _draw((text_width, text_width), i) for i in range(n_text)}
    text[f"{n_text}.fc.0.weight"] = _draw((embed, text_width), 99)
    torch.save({"epoch": 5, "text_adapter": text, "text_optimizer": {"state": {}, "param_groups": []}},
               folder / "text_adapter.pth")
    proj = "fc.0.weight" if relu else "fc.weight"
    for epoch in epochs:
        image = {f"layer_adapters.{i}.fc.0.weight": _draw((width, width), 10 + i + epoch) for i in range(n_layer)}
        image.update({f"seg_proj.{j}.{proj}": _draw((embed, width), 20 + j + epoch) for j in range(4)})
        image[f"det_proj.{proj}"] = _draw((embed, width), 30 + epoch)
        torch.save({"epoch": epoch, "image_adapter": image, "image_optimizer": {"state": {}, "param_groups": []}},
                   folder / f"image_adapter_{epoch}.pth")
    return folder


def write_crane_ckpt(path: Path, text_width=48, n_ctx=12, t_n_ctx=4, n_compound=3) -> Path:
    g = torch.Generator().manual_seed(5)
    sd = {}
    for side, suffix_ids in (("pos", [14115, 269, 49407]), ("neg", [13568, 14115, 269, 49407])):
        sd[f"ctx_{side}"] = torch.randn(1, 1, n_ctx, text_width, generator=g) * 0.02
        sd[f"token_prefix_{side}"] = torch.randn(1, 1, 1, text_width, generator=g) * 0.02
        sd[f"token_suffix_{side}"] = torch.randn(1, 1, 77 - 1 - n_ctx, text_width, generator=g) * 0.02
        ids = torch.zeros(1, 1, 77, dtype=torch.int32)
        ids[0, 0, : 1 + n_ctx + len(suffix_ids)] = torch.tensor([49406] + [343] * n_ctx + suffix_ids)
        sd[f"tokenized_prompts_{side}"] = ids
    for i in range(n_compound):
        sd[f"compound_prompts_text.{i}"] = torch.randn(t_n_ctx, text_width, generator=g) * 0.02
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"prompt_learner": sd}, path)
    return path


class _Tree(torch.nn.Module):
    def forward(self) -> int:
        return 0


def write_torchscript(sd: dict, path: Path) -> None:
    """A TorchScript archive whose state_dict has OpenAI key names, like ViT-L-14-336px.pt."""
    root = _Tree()
    for key, value in sd.items():
        *parents, leaf = key.split(".")
        node = root
        for name in parents:
            if not hasattr(node, name):
                node.add_module(name, _Tree())
            node = getattr(node, name)
        node.register_parameter(leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
    torch.jit.save(torch.jit.script(root), str(path))


def make_tiny_files(root: Path) -> dict:
    from safetensors.torch import save_file

    sd = _sd()
    files = {"state_dict": root / "tiny_openai_layout.pt", "open_clip": root / "tiny_open_clip.pt",
             "safetensors": root / "tiny.safetensors", "torchscript": root / "tiny_jit.pt"}
    torch.save({k: v.half() for k, v in sd.items()}, files["state_dict"])
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in sd.items()}}, files["open_clip"])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(files["safetensors"]))
    write_torchscript(sd, files["torchscript"])
    files["aaclip"] = write_aaclip_ckpt(root / "aaclip_ckpt")
    files["crane"] = write_crane_ckpt(root / "crane" / "epoch_5.pth")
    files["state"] = sd
    return files


def write_good_samples(folder, count: int, seed: int) -> Path:
    """``count`` defect-free generated sample images in ``folder`` (the generator draws every second one with a
    defect: those are left out)."""
    import os

    from clipad.calibration.samples import write_samples

    for path in write_samples(str(folder), count=2 * count, seed=seed):
        if "_defect" in path:
            os.remove(path)
    return Path(folder)


def images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def export_tiny(tiny_files, out, kind="aaclip", extra=(), classes=("bottle", "screw")):
    """Run export-engine on the tiny configuration at 56 px (``classes`` for aaclip/clip)."""
    from clipad.export import cli as export_cli

    args = ["--model", kind, "--arch", TINY, "--image-size", "56", "--clip-weights", str(tiny_files["state_dict"]),
            "--output", str(out), "-q"]
    if kind in ("aaclip", "crane"):
        args += ["--ckpt", str(tiny_files[kind])]
    if kind != "crane":
        args += ["--class-name", *classes]
    return export_cli.main(args + list(extra))


def export_one_class(tiny_files, out, kind="aaclip", extra=()):
    return export_tiny(tiny_files, out, kind, extra, classes=("bottle",))


def manifest_json(out) -> dict:
    """The manifest as stored on disk (the format other tools read)."""
    import json

    return json.loads((Path(out) / "manifest.json").read_text())


def write_video(path, frames) -> str:
    """An MJPG AVI of ``frames`` (BGR uint8 arrays of one size); skips the test when OpenCV cannot encode MJPG."""
    import cv2
    import pytest

    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (width, height))
    if not writer.isOpened():
        pytest.skip("no MJPG encoder in this OpenCV build")
    for frame in frames:
        writer.write(frame)
    writer.release()
    return str(path)


def fp16_round_trips(model) -> list[str]:
    """Casts that take an FP32 tensor to FP16 and straight back (a 65504 clamp between two FP32 nodes)."""
    import onnx

    from clipad.export import convert as precision

    producer = {o: n for n in model.graph.node for o in n.output}
    to = precision._cast_to
    return [n.name for n in model.graph.node
            if n.op_type == "Cast" and to(n) == onnx.TensorProto.FLOAT and n.input[0] in producer
            and producer[n.input[0]].op_type == "Cast" and to(producer[n.input[0]]) == onnx.TensorProto.FLOAT16]
