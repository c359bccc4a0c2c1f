"""Inference backends behind one interface (base.Backend). Each imports its heavy library lazily."""
from .base import Backend, open_backend

__all__ = ["Backend", "open_backend"]
