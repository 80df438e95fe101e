"""Workflows: what wires a config, a dataset and the trainer together (the training run, the norm study)."""
