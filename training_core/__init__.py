"""Modron's training engine: datasets, models, the training loop, checkpoints and the worker.

Never imports Qt; the desktop app talks to it through `training_core.worker` only.
"""
__version__ = "0.1.0"
