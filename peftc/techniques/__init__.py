"""The built-in techniques, one declaration per file; importing this package registers them."""

from peftc.techniques import (
    adalora,
    boft,
    bottleneck,
    fourierft,
    hra,
    ia3,
    ln_tuning,
    loha,
    lokr,
    lora,
    oft,
    prefix,
    prompt,
    ptuning,
    side,
    vera,
)

__all__ = [
    "adalora",
    "boft",
    "bottleneck",
    "fourierft",
    "hra",
    "ia3",
    "ln_tuning",
    "loha",
    "lokr",
    "lora",
    "oft",
    "prefix",
    "prompt",
    "ptuning",
    "side",
    "vera",
]
