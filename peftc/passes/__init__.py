"""Structural passes: `identity`, `dce`, `freeze`, `merge` and adapter switching, `multi_lora`,
`outline`/`inline`, `fused_loss`.

Importing this package registers them (`peftc/__init__.py` does).
"""

from peftc.passes import fused_loss, generic, merge, multi_lora, outline

__all__ = ["fused_loss", "generic", "merge", "multi_lora", "outline"]
