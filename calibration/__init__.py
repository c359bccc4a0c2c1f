"""Image sets with the runtime's preprocessing (INT8 calibration, verify sets, samples), INT8 activation ranges, and
OK/NG thresholds from normal images (``edge-calibrate``)."""
