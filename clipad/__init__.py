"""clipad-edge: CLIP zero-shot anomaly detectors (AA-CLIP, Crane, zero-shot CLIP) for edge deployment.

Subpackages: ``clipad.runtime`` (torch-free edge runtime), ``clipad.export`` (torch model zoo and export),
``clipad.calibration`` and ``clipad.benchmarks``.
"""
__version__ = "0.1.0"
