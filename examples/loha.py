"""LoHa: the update is a Hadamard product of two low-rank products, dW = (B1 A1) * (B2 A2).

peftc computes the branch as `U (V x)` (Khatri-Rao factors) when that is cheaper than building
dW, so training never materialises an (out, in) update.

    python examples/loha.py [--steps 30]
"""

from __future__ import annotations

import math

import peftc

from shakespeare import adapt_train_merge, steps_from


def main(argv: list[str] | None = None) -> dict:
    result = adapt_train_merge(
        "freeze, loha(r=4, alpha=8, targets='all-linear')", steps_from(argv, __doc__)
    )
    computed = [n for n in peftc.tagged(result["gm"]) if "val" in n.meta and n.op != "get_attr"]
    # numbers per token (batch and sequence dims are symbolic): a dense dW would be 64 x 64 = 4,096
    per_token = max(
        math.prod(d for d in n.meta["val"].shape if isinstance(d, int)) for n in computed
    )
    result["largest_branch_tensor"] = per_token
    print(
        f"{len(computed)} inserted ops; the largest value a branch computes holds {per_token:,} "
        "numbers per token"
    )
    return result


if __name__ == "__main__":
    main()
