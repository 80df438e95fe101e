"""Evaluation: per-case and per-class overlap and surface metrics, summaries, reports and figures.

numpy and scipy only (no torch): :func:`medgn.evaluate.run.evaluate` is the Python API behind
``medgn evaluate``.
"""
