"""Built-in passes, one module per technique; importing this package registers them."""

from peftc.passes import (
    adalora,
    boft,
    bottleneck,
    fourierft,
    generic,
    hra,
    ia3,
    ln_tuning,
    loha,
    lokr,
    lora,
    merge,
    multi_lora,
    nf4,
    oft,
    outline,
    prefix,
    prompt,
    side,
    triton,
    vera,
)

__all__ = ["adalora", "boft", "bottleneck", "fourierft", "generic", "hra", "ia3", "ln_tuning", "lora", "loha", "lokr", "merge", "multi_lora", "nf4",
           "oft", "outline", "prefix", "prompt", "side", "triton", "vera"]
