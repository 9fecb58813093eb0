"""LoKr: the update is a Kronecker product, dW = W1 ⊗ (B A), computed as vec(W1 X W2^T) without dW.

python examples/lokr.py [--steps 30]
"""

from __future__ import annotations

from shakespeare import adapt_train_merge, steps_from


def main(argv: list[str] | None = None) -> dict:
    result = adapt_train_merge(
        "freeze, lokr(r=4, alpha=8, targets='all-linear')", steps_from(argv, __doc__)
    )
    shapes = {
        name.rsplit(".", 2)[-2]: tuple(p.shape)
        for name, p in result["gm"].named_parameters()
        if "layers.0.self_attn.q_proj.lokr" in name
    }
    print(f"q_proj (64 x 64) factors: {shapes}")
    return result


if __name__ == "__main__":
    main()
