"""The model kinds ``export-engine --model`` knows. Adding a model is one file in this folder (with ``QUICK_GELU``,
``read_checkpoint`` and ``build``; see ``factory.build_detector``) plus one ``ModelKind`` line below.

Torch-free on purpose: the command line lists the kinds without importing torch; the model file is imported only
when its kind is built.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from clipad.runtime.errors import ClipadError


@dataclass(frozen=True)
class ModelKind:
    name: str
    module: str                # clipad.export.models.<module>
    summary: str               # one line for --help
    needs_checkpoint: bool     # --ckpt required
    prompted_classes: bool     # class names go into the text prompts (required); else at most one, a label
    decision_score: str        # clipad.runtime.decision rule for OK/NG; "{domain}" is filled in
    uses_domain: bool = False  # industrial/medical domain from the class names (AA-CLIP's blur)
    parity_note: str = ""      # why torch and ONNX Runtime can legitimately differ, said when parity fails


KINDS = {k.name: k for k in (
    ModelKind("aaclip", "aaclip", "AA-CLIP (CVPR 2025): adapters from a training save folder", True, True,
              "aaclip_{domain}", uses_domain=True),
    ModelKind("crane", "crane", "Crane (2025): learned prompts from an epoch_N.pth checkpoint", True, False,
              "image_score"),
    ModelKind("clip", "zeroshot_clip", "zero-shot CLIP baseline: hand prompts, no training", False, True, "map_max"),
    ModelKind("crane_plus", "crane_plus", "Crane+ (2025): Crane with DINOv2-guided attention (--dino-weights)", True,
              False, "image_score",
              parity_note="the comparison already pinned Crane+'s D-Attn mask entries within float32 rounding of "
                          "its hard threshold to torch's (export/dattn_band.py), so what remains is more than "
                          "rounding"),
)}


def get_kind(name: str) -> ModelKind:
    if name not in KINDS:
        raise ClipadError(f"unknown model {name!r}; choose one of {', '.join(KINDS)}")
    return KINDS[name]


def model_module(kind: ModelKind):
    return importlib.import_module(f"clipad.export.models.{kind.module}")
