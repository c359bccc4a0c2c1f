"""Workstation side (needs torch): build faithful AA-CLIP / Crane / zero-shot CLIP models and export them."""
