"""QLoRA: the base weights become NF4 (bitsandbytes' bytes, ~4.13 bits each), LoRA trains on top.

Merging into a 4-bit base is a choice: requantizing erases most of a small update, a dense merge
keeps all of it; `merge` reports what survives.

    python examples/qlora.py [--steps 30]
"""

from __future__ import annotations

import peftc

from shakespeare import adapt_train_merge, steps_from


def main(argv: list[str] | None = None) -> dict:
    result = adapt_train_merge(
        "nf4, freeze, lora(r=8, alpha=16, targets='all-linear')",
        steps_from(argv, __doc__),
        merge='merge(dtype="float32")',
    )
    summary = peftc.summary(result["gm"])
    result["bits_per_weight"] = summary.quantized_bits_per_weight
    requantized = peftc.apply(result["gm"], "merge(requantize=true)")
    result["requantize_report"] = requantized.meta["peftc"]["history"][-1]["report"]
    print(
        f"NF4 weights: {summary.quantized_weights:,} at {summary.quantized_bits_per_weight:.3f} "
        "bits each"
    )
    print(f"merge(requantize=true): {result['requantize_report']}")
    return result


if __name__ == "__main__":
    main()
