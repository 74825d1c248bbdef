"""Which files of a model Modron reads or downloads: safetensors weights, never pickles or code.

Torch-free, so that the swarm's download step (training_core.swarm.sources, which the desktop app
imports) can use these lists without importing training_core.models, which imports torch.
"""
from __future__ import annotations

PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Hub files never needed: other frameworks' weights, and pickles we would refuse to load anyway.
HUB_IGNORE = [*PICKLED, "*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.gguf", "*.tflite", "*.ot",
              "original/*", "onnx/*", "coreml/*", "openvino/*"]
