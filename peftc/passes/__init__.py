"""Structural passes: `identity`, `dce`, `freeze`, `merge` and adapter switching, `load_adapter`,
`multi_lora`, `outline`/`inline`, `fused_loss`.

Importing this package registers them (`peftc/__init__.py` does).
"""

from peftc.passes import checkpoints, fused_loss, generic, merge, multi_lora, outline

__all__ = ["checkpoints", "fused_loss", "generic", "merge", "multi_lora", "outline"]
