"""Side tuning (Quantized Side Tuning, QST; Ladder Side-Tuning, LST): a small network beside a frozen base.

    taps   h_0 = the stream entering block 0 (embeddings), h_i = block i's output    (detached)
    g      = down_0(h_0);  for each block i:  z = sigmoid(gate_i),  g = side_i((1 - z) * down_{i+1}(h_i) + z * g)
    output h = (1 - a) * final + a * up(norm(g))      final: the base's final hidden state; a learned, 0 at init

1. Down samplers, one per tap: QST's Linear(d -> rank, no bias) -> swish -> Linear(rank -> d/r, no bias)
   -> LayerNorm(d/r) (`downsample="qst"`, rank 16), or LST's Linear(d -> d/r) (`downsample="linear"`).
2. Side blocks: fresh pre-LN transformer blocks of width d/r (self-attention under the base's own
   attention mask, or causal where the base attends causally without one; an MLP of 4 d/r), one per
   base block. They have no position encoding of their own: the taps carry the base's positions.
3. Gates start at QST's raw 0.5; the mix `a` starts at 0 so the model computes exactly what the base
   did (QST starts at sigmoid(1.0) and so changes the outputs at init).
4. The taps are detached and the base is frozen: no base op is recorded by autograd, so the base keeps
   no activations for backward; the side network's output goes through the frozen head.
5. The network is one submodule, `side_network`; `peftc.save_adapter` writes its tensors (safetensors)
   and these options (JSON) atomically, `peftc.load_adapter` rebuilds and fills it. `merge` leaves it.
   `qst` is the pipeline `nf4, side` (see docs/concepts.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from peftc._version import __version__
from peftc.ir.capture import capture
from peftc.ir.pipeline import Pipeline
from peftc.ir.registry import PassResult, register_pass
from peftc.technique.checkpoint import load_adapter, save_adapter
from peftc._io import atomic_dir
from peftc.technique.adapters import adapters
from peftc.errors import CheckpointError, OptionError, PassError
from peftc.ir.graph import freeze_parameters, peftc_meta, tag, tagged
from peftc.sites.regions import attention_sites, block_sites, final_hidden_states

__all__ = ["SideOptions", "SideNetwork", "side", "has_side", "save_side", "load_side"]

aten = torch.ops.aten
MODULE = "side_network"
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@dataclass(frozen=True)
class SideOptions:
    reduction_factor: int = 16  # side width d / reduction_factor
    downsample: Literal["qst", "linear"] = "qst"
    rank: int = 16  # QST's low-rank down sampler width
    heads: int | None = None  # side attention heads; default: width // 64, at least 1
    freeze_base: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("reduction_factor", "rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise OptionError(f"side: {name} must be a positive integer, got {value!r}")
        if self.downsample not in ("qst", "linear"):
            raise OptionError(f"side: downsample must be 'qst' or 'linear', got {self.downsample!r}")
        if self.heads is not None and self.heads < 1:
            raise OptionError(f"side: heads must be positive, got {self.heads}")


class _Downsample(nn.Module):
    def __init__(self, d: int, width: int, kind: str, rank: int):
        super().__init__()
        if kind == "qst":
            self.layers = nn.Sequential(nn.Linear(d, rank, bias=False), nn.SiLU(), nn.Linear(rank, width, bias=False),
                                        nn.LayerNorm(width))
        else:
            self.layers = nn.Sequential(nn.Linear(d, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.layers(h)


class _SideBlock(nn.Module):
    """A pre-LN transformer block of width `width`."""

    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1, self.qkv, self.out = nn.LayerNorm(width), nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None)
        x = x + self.out(attended.transpose(1, 2).flatten(-2))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class SideNetwork(nn.Module):
    def __init__(self, d: int, layers: int, options: SideOptions, causal: bool):
        super().__init__()
        width = d // options.reduction_factor
        heads = options.heads or max(1, width // 64)
        if width % heads:
            raise OptionError(f"side: the side width {width} is not divisible by heads={heads}")
        self.downsamplers = nn.ModuleList(_Downsample(d, width, options.downsample, options.rank) for _ in range(layers + 1))
        self.blocks = nn.ModuleList(_SideBlock(width, heads, causal) for _ in range(layers))
        self.gates = nn.Parameter(torch.full((layers, width), 0.5))
        self.norm = nn.LayerNorm(width)
        self.upsample = nn.Linear(width, d)
        self.mix = nn.Parameter(torch.zeros(()))

    def forward(self, taps: list[torch.Tensor], final: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        g = self.downsamplers[0](taps[0])
        for i, block in enumerate(self.blocks):
            z = torch.sigmoid(self.gates[i])
            g = block((1 - z) * self.downsamplers[i + 1](taps[i + 1]) + z * g, mask)
        return final + self.mix * (self.upsample(self.norm(g)) - final)


@register_pass("side", options=SideOptions, preserves_outputs=True)
def side(gm: fx.GraphModule, options: SideOptions) -> PassResult:
    """Side tuning (QST/LST): taps on every block's output feed a small side network whose output is mixed
    into the base's final hidden state before the head; the base is frozen and keeps no activations.

    1. Down samplers (QST low-rank or LST linear) to width d / reduction_factor, gated side blocks.
    2. The mix with the base's final hidden state starts at 0: outputs are unchanged at init.
    """
    if has_side(gm):
        raise PassError("side: this graph already has a side network; one per graph: start from the graph before 'side'")
    finals = final_hidden_states(gm)
    if len(finals) != 1:
        raise PassError(f"side: needs one stack of blocks feeding the head, found {len(finals)} "
                        f"({', '.join(f.blocks for f in finals) or 'no repeated blocks'}); encoder-decoder models are "
                        "not supported")
    final = finals[0]
    blocks = [b for b in block_sites(gm) if b.path.rpartition(".")[0] == final.blocks]
    if blocks[0].input is None:
        raise PassError(f"side: the stream entering {blocks[0].path} was not found, so there is no embedding tap")
    val = final.node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise PassError("side: the final hidden state has no recorded shape; capture with peftc.capture")
    d = int(val.shape[-1])
    if d // options.reduction_factor < 1:
        raise OptionError(f"side: reduction_factor={options.reduction_factor} is larger than the hidden size {d}")
    attention = [s for s in attention_sites(gm) if s.path.startswith(blocks[0].path + ".")]
    mask = attention[0].mask if attention else None
    causal = bool(attention and attention[0].is_causal)

    if options.freeze_base:  # the base; adapters already inserted keep training
        freeze_parameters(gm, keep={q for r in adapters(gm).values() for q in r.param_names})
    if options.seed is not None:
        torch.manual_seed(options.seed)
    network = SideNetwork(d, len(blocks), options, causal).to(dtype=val.dtype, device=val.device)
    gm.add_submodule(MODULE, network)
    graph = gm.graph
    with graph.inserting_before(final.node.next):  # in order, right after the final hidden state
        taps = []
        for i, node in enumerate([blocks[0].input] + [b.output for b in blocks]):
            taps.append(tag(graph.call_function(aten.detach.default, (node,)), pass_name="side", role=f"tap_{i}",
                            path=MODULE))
        base = tag(graph.call_function(aten.detach.default, (final.node,)), pass_name="side", role="final", path=MODULE)
        out = tag(graph.call_module(MODULE, (taps, base, mask)), pass_name="side", role="output", path=MODULE)
    ours = set(taps) | {base, out}
    final.node.replace_all_uses_with(out, delete_user_cb=lambda user: user not in ours)
    peftc_meta(gm)["side"] = {"options": asdict(options), "blocks": [b.path for b in blocks]}
    gm.graph.lint()
    gm.recompile()
    trainable = sum(p.numel() for p in network.parameters())
    return PassResult(gm, modified=True, sites=tuple(b.path for b in blocks),
                            report=f"side network of width {d // options.reduction_factor} over {len(blocks)} blocks "
                                   f"({trainable:,} parameters), mixed into {final.path}")


def has_side(gm: fx.GraphModule) -> bool:
    return any(True for _ in tagged(gm, **{"pass": "side"}, role="output"))


def save_side(gm: fx.GraphModule, directory: str | Path) -> Path:
    """The side network's tensors (safetensors) and options (JSON), as a peft-style folder, atomically."""
    from safetensors.torch import save_file

    if not has_side(gm):
        raise CheckpointError("this graph has no side network to save; apply 'side' first")
    config = {"peftc_technique": "side", "peftc_version": __version__, **peftc_meta(gm)["side"]}
    tensors = {f"{MODULE}.{k}": v.detach().contiguous() for k, v in gm.get_submodule(MODULE).state_dict().items()}
    with atomic_dir(directory) as tmp:
        save_file(tensors, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(directory)


def load_side(gm: fx.GraphModule, directory: str | Path) -> fx.GraphModule:
    """A copy of `gm` rewritten by `side` with the options and tensors saved in `directory`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / CONFIG).read_text())
    out = Pipeline([("side", config["options"])]).run(gm).graph_module
    blocks = peftc_meta(out)["side"]["blocks"]
    if blocks != config["blocks"]:
        raise CheckpointError(f"checkpoint {directory} does not fit this model: its side network was trained over blocks "
                              f"{', '.join(config['blocks'][:3])} ..., this model has {', '.join(blocks[:3])} ...; load it "
                              "into the model it was trained on")
    found = {k.removeprefix(f"{MODULE}."): v for k, v in load_file(directory / WEIGHTS).items()}
    network = out.get_submodule(MODULE)
    expected = network.state_dict()
    wrong = sorted(set(expected) ^ set(found)) + [k for k in set(expected) & set(found) if expected[k].shape != found[k].shape]
    if wrong:
        raise CheckpointError(f"checkpoint {directory} does not fit this model's side network: {', '.join(wrong[:6])}"
                              f"{' ...' if len(wrong) > 6 else ''}; load it into the model it was trained on")
    network.load_state_dict(found)
    return out
