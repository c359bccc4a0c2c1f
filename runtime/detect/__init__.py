"""``edge-detect``: the command (``cli``), its staged run (``staged``) and what it does with each result
(``frame_outputs``)."""
