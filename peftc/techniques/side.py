"""Side tuning (Quantized Side Tuning, QST; Ladder Side-Tuning, LST): a small network beside a
frozen base.

    taps   h_0 = the stream entering block 0 (embeddings), h_i = block i's output    (detached)
    g      = down_0(h_0);  for each block i:  z = sigmoid(gate_i),
                                              g = side_i((1 - z) * down_{i+1}(h_i) + z * g)
    output h = (1 - a) * final + a * up(norm(g))
             final: the base's final hidden state; a learned, 0 at init

1. Down samplers, one per tap: QST's Linear(d -> rank, no bias) -> swish -> Linear(rank -> d/r,
   no bias) -> LayerNorm(d/r) (`downsample="qst"`, rank 16), or LST's Linear(d -> d/r)
   (`downsample="linear"`).
2. Side blocks: fresh pre-LN transformer blocks of width d/r (self-attention under the base's own
   attention mask, or causal where the base attends causally without one; an MLP of 4 d/r), one per
   base block. They have no position encoding of their own: the taps carry the base's positions.
3. Gates start at QST's raw 0.5; the mix `a` starts at 0 so the model computes exactly what the base
   did (QST starts at sigmoid(1.0) and so changes the outputs at init).
4. The taps are detached and the base is frozen: no base op is recorded by autograd, so the base
   keeps no activations for backward; the side network's output goes through the frozen head.
5. The network is one submodule, `side_network.<adapter>`, at the `final_hidden` site (an output
   stage); `peftc.save_adapter` writes its tensors and these options in peftc's format,
   `peftc.load_adapter` rebuilds and fills it. `merge` leaves it. `qst` is the pipeline `nf4, side`
   (see docs/concepts.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from peftc.errors import OptionError, PassError
from peftc.sites.regions import FinalHiddenState, attention_sites, block_sites, final_hidden_states
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Technique,
    option,
    pattern,
    positive,
    register_technique,
)

__all__ = ["SideOptions", "SideNetwork", "Side"]

aten = torch.ops.aten


@dataclass(frozen=True)
class SideOptions(AdapterOptions):
    targets: str | None = option(
        None,
        doc="the final hidden state to mix into (the one stack feeding the head)",
        check=pattern,
    )
    reduction_factor: int = option(16, doc="side width d / reduction_factor", check=positive)
    downsample: Literal["qst", "linear"] = option(
        "qst", doc="QST's low-rank down samplers, or LST's linear ones"
    )
    rank: int = option(16, doc="width inside QST's down samplers", check=positive)
    heads: int | None = option(
        None, doc="side attention heads (None: width // 64, at least 1)", check=positive
    )
    seed: int | None = option(
        None, doc="seed of the side network's init (None: the global generator)"
    )


class _Downsample(nn.Module):
    def __init__(self, d: int, width: int, kind: str, rank: int):
        super().__init__()
        if kind == "qst":
            self.layers = nn.Sequential(
                nn.Linear(d, rank, bias=False),
                nn.SiLU(),
                nn.Linear(rank, width, bias=False),
                nn.LayerNorm(width),
            )
        else:
            self.layers = nn.Sequential(nn.Linear(d, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.layers(h)


class _SideBlock(nn.Module):
    """A pre-LN transformer block of width `width`."""

    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1, self.qkv, self.out = (
            nn.LayerNorm(width),
            nn.Linear(width, 3 * width),
            nn.Linear(width, width),
        )
        self.norm2, self.fc1, self.fc2 = (
            nn.LayerNorm(width),
            nn.Linear(width, 4 * width),
            nn.Linear(4 * width, width),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal and mask is None
        )
        x = x + self.out(attended.transpose(1, 2).flatten(-2))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class SideNetwork(nn.Module):
    def __init__(self, d: int, layers: int, options: SideOptions, causal: bool):
        super().__init__()
        width = d // options.reduction_factor
        heads = options.heads or max(1, width // 64)
        if width % heads:
            raise OptionError(f"side: the side width {width} is not divisible by heads={heads}")
        self.downsamplers = nn.ModuleList(
            _Downsample(d, width, options.downsample, options.rank) for _ in range(layers + 1)
        )
        self.blocks = nn.ModuleList(_SideBlock(width, heads, causal) for _ in range(layers))
        self.gates = nn.Parameter(torch.full((layers, width), 0.5))
        self.norm = nn.LayerNorm(width)
        self.upsample = nn.Linear(width, d)
        self.mix = nn.Parameter(torch.zeros(()))

    def forward(
        self, taps: list[torch.Tensor], final: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        g = self.downsamplers[0](taps[0])
        for i, block in enumerate(self.blocks):
            z = torch.sigmoid(self.gates[i])
            g = block((1 - z) * self.downsamplers[i + 1](taps[i + 1]) + z * g, mask)
        return final + self.mix * (self.upsample(self.norm(g)) - final)


@register_technique
class Side(Technique):
    """Side tuning (QST/LST): taps on every block's output feed a small side network whose output is
    mixed into the base's final hidden state before the head; the base is frozen and keeps no
    activations.

    1. Down samplers (QST low-rank or LST linear) to width d / reduction_factor, gated side blocks.
    2. The mix with the base's final hidden state starts at 0: outputs are unchanged at init.
    """

    name = "side"
    # no peft counterpart: its tensors take the model's dtype
    half_precision = "base"
    options = SideOptions
    site_kinds = ("final_hidden",)
    stage = "output"
    exclusive = True
    mergeable = False

    def select(self, gm: fx.GraphModule, options: SideOptions) -> list[tuple[Any, str]]:
        finals = final_hidden_states(gm, options.targets)
        if len(finals) != 1:
            raise PassError(
                f"side: needs one stack of blocks feeding the head, found {len(finals)} "
                f"({', '.join(f.blocks for f in finals) or 'no repeated blocks'}); encoder-decoder "
                "models are not supported"
            )
        return [(finals[0], "")]

    def check(self, gm: fx.GraphModule, site: FinalHiddenState, options: SideOptions) -> None:
        blocks = _blocks(gm, site)
        if blocks[0].input is None:
            raise PassError(
                f"side: the stream entering {blocks[0].path} was not found, so there is no "
                "embedding tap"
            )
        d = _width(site)
        if d // options.reduction_factor < 1:
            raise OptionError(
                f"side: reduction_factor={options.reduction_factor} is larger than the hidden size "
                f"{d}"
            )

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        gm, site, options = ctx.gm, ctx.site, ctx.options
        blocks = _blocks(gm, site)
        attention = [s for s in attention_sites(gm) if s.path.startswith(blocks[0].path + ".")]
        if options.seed is not None:
            torch.manual_seed(options.seed)
        network = SideNetwork(
            _width(site), len(blocks), options, bool(attention and attention[0].is_causal)
        )
        return {"side_network": network.to(dtype=site.node.meta["val"].dtype)}

    def build(self, b: Builder, final: fx.Node) -> fx.Node:
        blocks = _blocks(b.gm, b.site)
        attention = [s for s in attention_sites(b.gm) if s.path.startswith(blocks[0].path + ".")]
        taps = [
            b.call(aten.detach.default, node, role=f"tap_{i}")
            for i, node in enumerate([blocks[0].input] + [block.output for block in blocks])
        ]
        base = b.call(aten.detach.default, final, role="final")
        return b.module(
            "side_network", taps, base, attention[0].mask if attention else None, role="output"
        )

    def describe(self, options: SideOptions, sites: list[Any]) -> str:
        gm = sites[0].node.graph.owning_module
        width = _width(sites[0]) // options.reduction_factor
        return (
            f"side network of width {width} over {len(_blocks(gm, sites[0]))} blocks, mixed into "
            f"{sites[0].path}, adapter {options.adapter!r}"
        )


def _blocks(gm: fx.GraphModule, final: FinalHiddenState) -> list[Any]:
    return [b for b in block_sites(gm) if b.path.rpartition(".")[0] == final.blocks]


def _width(final: FinalHiddenState) -> int:
    val = final.node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise PassError(
            "side: the final hidden state has no recorded shape; capture with peftc.capture"
        )
    return int(val.shape[-1])
