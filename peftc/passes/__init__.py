"""Structural passes: `identity`, `dce`, `freeze`, `merge` and adapter switching, `multi_lora`,
`outline`/`inline`.

Importing this package registers them (`peftc/__init__.py` does).
"""

from peftc.passes import generic, merge, multi_lora, outline

__all__ = ["generic", "merge", "multi_lora", "outline"]
