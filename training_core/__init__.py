"""Modron's training engine: datasets, models, the training loop, checkpoints and the worker.

Never imports Qt; the desktop app talks to it through its one entry point, `python -m training_core.cli`, only.
"""
__version__ = "0.1.0"
