"""Modron's desktop app (PySide6). Never imports torch, transformers, peft or hivemind."""
