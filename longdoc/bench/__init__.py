"""Needle tasks and benchmark helpers, shared by tests, the needle-model training script and `longdoc bench`."""
