"""Inference: load trained models, predict whole scans with sliding windows, write masks with the input's geometry.

:func:`medgn.infer.run.infer` is the Python API behind ``medgn infer``.
"""
