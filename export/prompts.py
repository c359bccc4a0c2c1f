"""Prompt data: AA-CLIP's (verbatim from its dataset/constants.py) and zero-shot CLIP ensembles."""
from __future__ import annotations

from clipad.runtime.errors import ClipadError

AACLIP_NORMAL_STATES = ["{}", "a {}", "the {}"]
AACLIP_ABNORMAL_STATES = ["a damaged {}", "a broken {}", "a {} with flaw", "a {} with defect", "a {} with damage"]
AACLIP_TEMPLATES = ["{}.", "a photo of {}."]

# AA-CLIP's REAL_NAMES: dataset class name → the object description used in the prompts.
REAL_NAMES = {
    "MVTec": {
        "bottle": "dark bottle", "cable": "top view of three cables", "capsule": "black and orange capsule",
        "carpet": "gray carpet", "grid": "metal or plastic mesh", "hazelnut": "single brown hazelnut",
        "leather": "brown leather", "metal_nut": "metal nut which has four notched edges",
        "pill": "oval white pill with small red speckles and the letters 'FF' engraved", "screw": "screw",
        "tile": "speckled tile surface", "transistor": "a three-legged transistor placed vertically",
        "toothbrush": "toothbrush head", "wood": "wood surface", "zipper": "a black zipper",
    },
    "VisA": {
        "candle": "candle", "pcb3": "infrared sensor pcb module", "capsules": "capsules",
        "pipe_fryum": "pipe-shaped fryum", "pcb4": "battery charging pcb module",
        "macaroni2": "scattered yellow macaroni", "pcb2": "integrated circuits board", "chewinggum": "chewing gum",
        "macaroni1": "orange macaroni", "cashew": "cashew nut", "fryum": "wheel-shaped fryum snack",
        "pcb1": "dual ultrasonic distance sensor pcb module",
    },
    "MPDD": {
        "connector": "metal clamps with black adjustment knobs", "tubes": "scattered metal objects",
        "metal_plate": "blue rectangular metal plate with a notch on one side",
        "bracket_white": "white, elongated triangular metal bracket with a smooth, matte finish",
        "bracket_brown": "brown L-shaped metal bracket with smooth, glossy finish and multiple mounting holes "
                         "along its arms",
        "bracket_black": "black ornamental metal bracket with spiral design attached to a rectangular frame",
    },
    "BTAD": {
        "01": "Bright concentric rings in neon yellow and blue tones against a dark blue background, resembling a "
              "stylized wave or energy field radiating outward.",
        "02": "vertical fabric lines in warm, dusty pink and beige tones",
        "03": "oval concentric circular rings in gradient shades of blue and white",
    },
    "Medical": {
        "Brain": "scan", "Liver": "scan", "Retina": "scan", "Colon_clinicDB": "colon endoscopy image",
        "Colon_colonDB": "colon endoscopy image", "CVC-300": "colon endoscopy image", "Kvasir": "colon endoscopy image",
    },
}
MEDICAL_DATASETS = ("Medical",)


def resolve_class(name: str, dataset: str | None = None) -> tuple[str, str]:
    """Class name → (prompt object name, domain).

    Without ``dataset`` the name is used literally in the prompts (pick a short visual description, as the authors
    did), except for the official names above, which map to their table entry. With ``dataset`` the name must be in
    that dataset's table.
    """
    if dataset is not None:
        table = REAL_NAMES.get(dataset)
        if table is None:
            raise ClipadError(f"unknown dataset {dataset!r}; known: {', '.join(REAL_NAMES)}")
        if name not in table:
            raise ClipadError(f"unknown class {name!r} for dataset {dataset}; known: {', '.join(table)}")
        return table[name], "medical" if dataset in MEDICAL_DATASETS else "industrial"
    for ds, table in REAL_NAMES.items():
        if name in table:
            return table[name], "medical" if ds in MEDICAL_DATASETS else "industrial"
    if not name.strip():
        raise ClipadError("empty class name")
    return name, "industrial"


def aaclip_sentences(real_name: str) -> tuple[list[str], list[str]]:
    """6 normal and 10 abnormal sentences in the official order: template.format(state.format(name))."""
    normal = [t.format(s.format(real_name)) for s in AACLIP_NORMAL_STATES for t in AACLIP_TEMPLATES]
    abnormal = [t.format(s.format(real_name)) for s in AACLIP_ABNORMAL_STATES for t in AACLIP_TEMPLATES]
    return normal, abnormal


# Zero-shot CLIP: WinCLIP-style state words and templates (our choice for the untrained baseline).
ZS_NORMAL_STATES = ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                    "{} without damage"]
ZS_ABNORMAL_STATES = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]
ZS_TEMPLATES = ["a photo of a {}.", "a cropped photo of the {}.", "a close-up photo of a {}.",
                "a bright photo of a {}.", "a dark photo of the {}.", "a photo of the small {}.",
                "a photo of the large {}.", "there is a {} in the scene.", "this is a {} in the scene."]


def zeroshot_sentences(real_name: str) -> tuple[list[str], list[str]]:
    normal = [t.format(s.format(real_name)) for s in ZS_NORMAL_STATES for t in ZS_TEMPLATES]
    abnormal = [t.format(s.format(real_name)) for s in ZS_ABNORMAL_STATES for t in ZS_TEMPLATES]
    return normal, abnormal
