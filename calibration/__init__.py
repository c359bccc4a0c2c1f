"""INT8 calibration data and normal-image thresholds (arrives with the calibration / precision issues)."""
