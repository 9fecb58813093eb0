"""Triton lowering of fused base + adapter linears (planned; see docs/architecture.md)."""
