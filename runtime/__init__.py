"""Lean, torch-free edge runtime: preprocessing, inference backends, post-processing.

Heavy imports (onnxruntime, tensorrt, cv2) are done lazily inside the functions that need them.
"""
from .errors import ClipadError

__all__ = ["ClipadError"]
