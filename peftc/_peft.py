"""peft's modules, for the tables and filters peftc reads from the installed peft."""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

__all__ = ["peft_module"]


def peft_module(name: str) -> ModuleType:
    """`importlib.import_module(name)` for a module of peft (ImportError when peft is missing).

    Importing peft imports bitsandbytes, which on CPUs with AVX512-BF16 logs that it could not
    fetch a kernel from the Hub; that says nothing about a table lookup, so it is not shown."""
    bitsandbytes = logging.getLogger("bitsandbytes")
    level = bitsandbytes.level
    bitsandbytes.setLevel(logging.ERROR)
    try:
        return importlib.import_module(name)
    finally:
        bitsandbytes.setLevel(level)
