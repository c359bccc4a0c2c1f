"""Compatibility: Triton repositories written before the serving/ layout import their Python-backend models from
here (``from clipad.runtime.triton_python import Preprocess as TritonPythonModel``)."""
from .serving.triton_models import OnnxModel, Postprocess, Preprocess, ServedDecisions  # noqa: F401
