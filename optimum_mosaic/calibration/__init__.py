"""Calibration: text → token windows → layer-by-layer statistics."""
