"""Backends that lower a rewritten graph: `triton` for training kernels, `onnx` for deployment."""
