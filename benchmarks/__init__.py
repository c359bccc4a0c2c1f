"""Latency and accuracy benchmarks (``edge-bench``, ``edge-eval`` arrive with the evaluation issue)."""
