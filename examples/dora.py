"""DoRA: LoRA on the direction of each weight plus a trained magnitude per output row, then merged.

python examples/dora.py [--steps 30]
"""

from __future__ import annotations

from shakespeare import adapt_train_merge, steps_from


def main(argv: list[str] | None = None) -> dict:
    # merge folds W' = m * (W + s B A) / ||W + s B A|| row by row
    return adapt_train_merge(
        "freeze, lora(r=8, alpha=16, dora=true, targets='all-linear')", steps_from(argv, __doc__)
    )


if __name__ == "__main__":
    main()
