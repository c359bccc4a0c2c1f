"""Inference backends behind one interface (``base.Backend``); ``select.open_backend`` picks one. Each backend
imports its heavy library lazily."""
