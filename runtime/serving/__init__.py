"""Serving: the Triton launcher (``edge_serve``) and the Triton Python-backend models (``triton_models``)."""
