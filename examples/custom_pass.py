"""Write your own pass: scale every attention output by a learnable scalar, initialised to 1.

    attn = scaled_dot_product_attention(q, k, v)
      ->  attn = mul(scaled_dot_product_attention(q, k, v), scale)

Registered under a name, it runs from pipeline text like the built-in passes:

    python examples/custom_pass.py
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

import peftc
from peftc.ir.graph import set_tensor
from peftc.ir.options import Options, option, positive


@dataclass(frozen=True)
# typed and checked on construction; the docs show in `peftc passes`
class AttnScaleOptions(Options):
    targets: str | None = option(None, doc="attention modules to scale (all by default)")
    init: float = option(1.0, doc="the scales' initial value", check=positive)


@peftc.register_pass("attn_scale", options=AttnScaleOptions, preserves_outputs=True, replace=True)
def attn_scale(gm: fx.GraphModule, options: AttnScaleOptions) -> peftc.PassResult:
    """Multiply each attention output by a learnable scalar `<attention path>.attn_scale`.

    1. Every `scaled_dot_product_attention` site matching `targets` gets one scalar.
    2. The scalar starts at `init` (1.0 keeps the model's function).
    """
    sites = peftc.attention_sites(gm, options.targets)
    for site in sites:
        name = f"{site.path}.attn_scale"
        set_tensor(gm, name, nn.Parameter(torch.full((), options.init)))
        with gm.graph.inserting_after(site.node):
            scale = gm.graph.get_attr(name)
        with gm.graph.inserting_after(scale):
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (site.node, scale))
        site.node.replace_all_uses_with(
            scaled, delete_user_cb=lambda user, new=scaled: user is not new
        )
        peftc.tag(scale, pass_name="attn_scale", role="scale", path=site.path)
        peftc.tag(scaled, pass_name="attn_scale", role="scaled_output", path=site.path)
    return peftc.PassResult(gm, modified=bool(sites), sites=tuple(s.path for s in sites))


def main() -> None:
    from peftc.tools.models import load_model

    loaded = load_model("tiny-llama")
    gm = peftc.capture(loaded.model, loaded.args, loaded.kwargs)
    scaled = peftc.apply(gm, "freeze, attn_scale(init=1.0)", check_numerics=True)
    print(peftc.diff(gm, scaled))
    trainable = [name for name, p in scaled.named_parameters() if p.requires_grad]
    print("trainable:", ", ".join(trainable))


if __name__ == "__main__":
    main()
