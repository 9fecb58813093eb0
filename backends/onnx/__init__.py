"""ONNX export for ONNX Runtime deployment (planned; see docs/architecture.md)."""
