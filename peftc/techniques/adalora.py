"""AdaLoRA: an SVD-shaped low-rank update P Λ Q beside linear and 2-D convolution sites, as in HF
peft.

    y = W x + b  ->  y = W x + b + (dropout(x) (A ⊙ E)^T B^T) * alpha / (ranknum + 1e-5)
    y = conv(x)  ->  y = conv(x) + conv(dropout(x), reshape(B (A ⊙ E) * alpha / (ranknum + 1e-5)))

1. Each site holds `lora_A` (r, in), `lora_E` (r, 1) (the singular values), `lora_B` (out, r)
   and the frozen `ranknum` = init_r; r is `init_r`, or the rank left after pruning: a
   `rank_pattern` entry `[path, mask]` (peft's `<path>.lora_E: [bool] * init_r`) gives the site
   rank `sum(mask)` while `ranknum` stays `init_r`, as peft reloads a pruned checkpoint. The scale
   is `alpha` (peft's `lora_alpha`, not alpha / r; `r` if alpha <= 0) over `ranknum + 1e-5`.
2. `init_weights=true` (peft's default) starts E at zero and A, B at N(0, 0.02), so at init the
   module computes what it did; `false` draws all three from N(0, 1).
3. Linear sites (nn.Linear, NF4 as peft's SVDLinear4bit, GPT-2 Conv1D) and ungrouped Conv2d
   sites, as in peft. Merge adds `B (A ⊙ E) * alpha / (ranknum + 1e-5)` to W.
4. Training the AdaLoRA way (importance scores, the budget schedule, pruning, the orthogonal
   regulariser) is `peftc.techniques.adalora_allocator`: `RankAllocator(gm)` and its
   `update_and_allocate(step)` after each backward pass, as peft's; its mask becomes
   `rank_pattern`, and saving writes the kept triplets only.
Parameters: `<path>.lora_A.<adapter>`, `.lora_E.<adapter>`, `.lora_B.<adapter>` (saved as peft's
`base_model.model.<path>.lora_A` ...), `<path>.ranknum.<adapter>` (not saved, as in peft).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from peftc.errors import OptionError
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    dropout_option,
    option,
    positive,
    register_technique,
)
from peftc.techniques.lora import refuse_on_mamba

__all__ = ["AdaloraOptions", "Adalora"]

aten = torch.ops.aten


def _rank_pattern_from_peft(pattern: Any) -> list:
    return [[_path_of(k), [bool(m) for m in mask]] for k, mask in (pattern or {}).items()]


@dataclass(frozen=True)
class AdaloraOptions(AdapterOptions):
    init_r: int = option(12, doc="the starting rank of every site", check=positive, peft="init_r")
    alpha: float = option(
        8.0, doc="the update's scale numerator (0: the site's rank)", peft="lora_alpha"
    )
    dropout: float = dropout_option("lora_dropout")
    init_weights: bool = option(
        True, doc="peft's init (E and B zero)", peft="init_lora_weights", decode=bool
    )
    rank_pattern: tuple[Any, ...] = option(
        (),
        doc="[path, [bool] * init_r] pairs: the ranks kept at each site (peft's rank_pattern)",
        peft="rank_pattern",
        encode=lambda pairs: {f"{path}.lora_E": list(mask) for path, mask in pairs} or None,
        decode=_rank_pattern_from_peft,
    )
    # the allocation schedule (`peftc.techniques.adalora_allocator.RankAllocator`)
    target_r: int = option(
        8, doc="the schedule's final average rank per site (the RankAllocator)", peft="target_r"
    )
    tinit: int = option(0, doc="steps before pruning starts (schedule)", peft="tinit")
    tfinal: int = option(0, doc="steps after pruning ends (schedule)", peft="tfinal")
    deltaT: int = option(1, doc="steps between allocations (schedule)", peft="deltaT")
    beta1: float = option(0.85, doc="importance smoothing (schedule)", peft="beta1")
    beta2: float = option(0.85, doc="uncertainty smoothing (schedule)", peft="beta2")
    orth_reg_weight: float = option(
        0.5, doc="orthogonal regularisation weight (schedule)", peft="orth_reg_weight"
    )
    total_step: int | None = option(None, doc="total training steps (schedule)", peft="total_step")

    def __post_init__(self) -> None:
        super().__post_init__()
        for pair in self.rank_pattern:
            if not (
                isinstance(pair, tuple)
                and len(pair) == 2
                and isinstance(pair[0], str)
                and isinstance(pair[1], tuple)
                and all(isinstance(m, bool) for m in pair[1])
                and len(pair[1]) == self.init_r
            ):
                raise OptionError(
                    "adalora: rank_pattern holds [path, mask] pairs with a mask of "
                    f"init_r={self.init_r} booleans (peft's rank_pattern), got {pair!r}"
                )

    def rank_at(self, path: str) -> int:
        return sum(dict(self.rank_pattern).get(path, (True,) * self.init_r))


def _path_of(key: str) -> str:
    """peft's rank_pattern key `<path>.lora_E` (or `<path>.lora_E.<adapter>`) -> `<path>`."""
    path, found, _ = key.rpartition(".lora_E")
    if not found:
        raise OptionError(
            f"adalora: rank_pattern key {key!r} does not name a lora_E (peft writes '<module "
            "path>.lora_E')"
        )
    return path


@register_technique
class Adalora(Technique):
    """Insert AdaLoRA branches: `y = W x + b -> y = W x + b + (x (A ⊙ E)^T B^T) * alpha / (ranknum +
    1e-5)`."""

    name = "adalora"
    options = AdaloraOptions
    peft_type = "ADALORA"
    peft_fixed = {"bias": "none"}
    # fields of peft's LoRA config its AdaLoRA ignores (init_r is the rank); qalora_group_size
    # matters only with
    # use_qalora, refused when set; the layout is read from the graph
    peft_ignored = ("r", "use_rslora", "alpha_pattern", "qalora_group_size", "fan_in_fan_out")
    site_kinds = ("linear", "conv")
    # over a half-precision model peft's casts also make the frozen ranknum trainable (its
    # ParameterDict re-wraps the cast copy); here it stays frozen, as peft keeps it in float32
    half_precision = "float32"

    def check(self, gm: fx.GraphModule, site: Any, options: AdaloraOptions) -> None:
        refuse_on_mamba(gm, site, "adalora")
        if site.kind == "conv" and (site.dims != 2 or site.groups != 1):
            raise OptionError(
                f"adalora: {site.path!r} is a {site.dims}-d convolution with groups={site.groups}; "
                "peft's AdaLoRA supports only ungrouped Conv2d: exclude it from targets"
            )

    def params(self, ctx: Context) -> list[Param]:
        site, o = ctx.site, ctx.options
        r = o.rank_at(site.path)
        fan_in = (
            site.in_features
            if site.kind == "linear"
            else site.in_channels * math.prod(site.kernel_size)
        )
        out = site.out_features if site.kind == "linear" else site.out_channels
        if o.init_weights:
            small = lambda t: nn.init.normal_(t, mean=0.0, std=0.02)  # noqa: E731
            init_a = init_b = small
            init_e = None
        else:
            init_a = init_b = init_e = nn.init.normal_
        # peft resizes a pruned layer but keeps its ranknum at init_r (rank 0 pruned: ranknum 0)
        ranknum = torch.tensor([float(o.init_r if r > 0 else 0)])
        return [
            Param("lora_A", (r, fan_in), init=init_a),
            Param("lora_E", (r, 1), init=init_e),
            Param("lora_B", (out, r), init=init_b),
            Param("ranknum", value=ranknum, trainable=False),
        ]

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        return {"lora_dropout": nn.Dropout(ctx.options.dropout)} if ctx.options.dropout > 0 else {}

    def _scaling(self, site: Any, options: AdaloraOptions) -> float:
        return options.alpha if options.alpha > 0 else float(options.rank_at(site.path))

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        site, s = b.site, self._scaling(b.site, b.options)
        if b.options.dropout > 0:
            x = b.module("lora_dropout", x, role="dropout")
        a_e = b.call(aten.mul.Tensor, b.param("lora_A"), b.param("lora_E"), role="lora_AE")
        ranknum = b.call(aten.add.Tensor, b.param("ranknum"), 1e-5, role="ranknum_eps")
        if site.kind == "conv":  # peft's SVDConv2d builds the (out, in, kh, kw) update
            delta = b.call(aten.mm.default, b.param("lora_B"), a_e, role="lora_BAE")
            delta = b.call(
                aten.div.Tensor,
                b.call(aten.mul.Tensor, delta, s, role="scaled"),
                ranknum,
                role="delta_weight",
            )
            shape = [site.out_channels, site.in_channels, *site.kernel_size]
            delta = b.call(aten.reshape.default, delta, shape, role="delta_weight_conv")
            conv = aten.conv2d.padding if isinstance(site.padding, str) else aten.conv2d.default
            padding = site.padding if isinstance(site.padding, str) else list(site.padding)
            stride, dilation = list(site.stride), list(site.dilation)
            return b.call(conv, x, delta, None, stride, padding, dilation, 1, role="adalora_out")
        # peft's order: (dropout(x) @ (A * E).T @ B.T) * scaling / (ranknum + 1e-5)
        h = b.call(
            aten.matmul.default, x, b.call(aten.t.default, a_e, role="lora_AE_t"), role="lora_A_out"
        )
        h = b.call(
            aten.matmul.default,
            h,
            b.call(aten.t.default, b.param("lora_B"), role="lora_B_t"),
            role="lora_B_out",
        )
        return b.call(
            aten.div.Tensor,
            b.call(aten.mul.Tensor, h, s, role="scaled"),
            ranknum,
            role="adalora_out",
        )

    def delta(self, ctx: Context) -> torch.Tensor:
        site = ctx.site
        a, e, b = (
            ctx.tensor("lora_A").float(),
            ctx.tensor("lora_E").float(),
            ctx.tensor("lora_B").float(),
        )
        delta = (
            b @ (a * e) * self._scaling(site, ctx.options) / (ctx.tensor("ranknum").float() + 1e-5)
        )
        return (
            delta.reshape(site.out_channels, site.in_channels, *site.kernel_size)
            if site.kind == "conv"
            else delta
        )

    def saved(self, options: AdaloraOptions, attr: str) -> bool:
        return attr != "ranknum"  # peft recreates it as init_r

    def to_checkpoint(
        self, ctx: Context, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The kept triplets only where the allocator masked full-rank factors (peft's
        resize_state_dict_by_rank_pattern)."""
        masks = {path: torch.tensor(kept) for path, kept in ctx.options.rank_pattern}
        out = {}
        for key, value in tensors.items():
            path, _, attr = key.removeprefix("base_model.model.").rpartition(".")
            mask = masks.get(path)
            if mask is None or value.shape[attr == "lora_B"] != len(mask):
                out[key] = value
            else:
                out[key] = value[:, mask] if attr == "lora_B" else value[mask]
        return out

    def after_insert(self, gm: fx.GraphModule, sites: list[Any], options: AdaloraOptions) -> None:
        unknown = sorted(set(dict(options.rank_pattern)) - {s.path for s in sites})
        if unknown:
            raise OptionError(
                f"adalora: rank_pattern names {', '.join(map(repr, unknown))}, which the targets "
                "do not select; target them too, or load the checkpoint into the model it was "
                "trained on"
            )

    def to_peft(self, options: AdaloraOptions, sites: list[Any]) -> dict[str, Any]:
        # peft refuses a config without a usable schedule; the smallest one loads and resumes
        return {
            "total_step": options.total_step or options.tinit + options.tfinal + 1,
            "fan_in_fan_out": any(getattr(s, "fan_in_fan_out", False) for s in sites),
        }

    def describe(self, options: AdaloraOptions, sites: list[Any]) -> str:
        pruned = sum(options.rank_at(s.path) < options.init_r for s in sites)
        return (
            f"AdaLoRA init_r={options.init_r} on {len(sites)} sites ({pruned} pruned), adapter "
            f"{options.adapter!r}; allocate ranks with peftc.techniques.adalora_allocator"
        )
