"""Inputs as data: a call's arguments checked and gathered into a ``Problem`` (data.py), its value checks
(values.py, deferred on CUDA by checks.py), and the one-sequence-per-row layout of packed batches (layout.py)."""
