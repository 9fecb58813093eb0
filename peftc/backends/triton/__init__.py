"""Triton lowering: fused NF4 + LoRA linears and the multi-adapter kernel (docs/triton.md).

`lowering` (the `triton` pass) imports the kernels only when it runs, so Triton stays optional.
"""
