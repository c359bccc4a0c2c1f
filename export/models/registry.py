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
              parity_note="Crane+'s D-Attn keeps a similarity only if it is >= 1.2 x mean(S), a hard threshold: an "
                          "entry within float rounding of it can fall differently in torch and ONNX Runtime, which "
                          "moved one magnetic_tile map by 2.7e-3 of its range; if other images agree to ~1e-7, that "
                          "is the cause, not the export"),
)}


def get_kind(name: str) -> ModelKind:
    if name not in KINDS:
        raise ClipadError(f"unknown model {name!r}; choose one of {', '.join(KINDS)}")
    return KINDS[name]


def model_module(kind: ModelKind):
    return importlib.import_module(f"clipad.export.models.{kind.module}")
