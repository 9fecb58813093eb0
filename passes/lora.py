"""LoRA and DoRA: low-rank updates beside linear, convolution and embedding sites, as in HF peft.

    y = W x + b  ->  y = W x + b + s * B A dropout(x)                       (LoRA, s = alpha / r)
    y = W x + b  ->  y = W x + b + (m/n - 1)(W x) + (m/n) s B A dropout(x)  (DoRA, n = ||W + s B A||_row, detached)
    e = E[ids]   ->  e = E[ids] + s * (A^T[ids] B^T)                         (embedding LoRA)
    y = conv(x)  ->  y = conv(x) + s * conv_1x1(conv_k(dropout(x), A), B)   (convolution LoRA)

1. Linear sites (`aten.linear`, `nn.Linear`, NF4, and GPT-2 `Conv1D`, whose weight is stored
   transposed as peft's `fan_in_fan_out`) get the LoRA or DoRA branch; DoRA reads NF4 bases
   through their weight format, as peft dequantizes bitsandbytes weights.
2. Embedding sites get the embedding branch (no dropout, as in peft).
3. Convolution sites (1d/2d/3d) get peft's pair of convolutions: A with the base's kernel,
   stride and padding, B a 1x1 convolution with the base's groups (r divisible by groups;
   grouped convolutions do not merge, as in peft).
4. A is Kaiming-uniform (`init="kaiming"`) or N(0, 1/r) (`"gaussian"`), B is zero, so at
   init the module computes what it computed before; for embeddings A is zero, B normal.
Parameters sit where peft puts them: `<path>.lora_A.<adapter>.weight`, `<path>.lora_B.<adapter>.weight`,
`<path>.lora_magnitude_vector.<adapter>.weight`, `<path>.lora_embedding_A.<adapter>`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from peftc.adapters import register_technique
from peftc.errors import OptionError
from peftc.graph import get_tensor, set_tensor
from peftc.technique import AdapterOptions, Builder, Context, NotMergeable, Param, Technique, kaiming_uniform

__all__ = ["LoraOptions", "Lora"]

aten = torch.ops.aten


@dataclass(frozen=True)
class LoraOptions(AdapterOptions):
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    init: Literal["kaiming", "gaussian"] = "kaiming"
    rslora: bool = False
    dora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r <= 0:
            raise OptionError(f"lora: r must be a positive integer, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise OptionError(f"lora: dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


@register_technique
class Lora(Technique):
    """Insert LoRA (or DoRA with `dora=true`) at the selected linear, convolution and embedding sites.

    `y = W x + b  ->  y = W x + b + s * B A dropout(x)`, s = alpha / r (alpha / sqrt(r) with `rslora`).
    The new adapter is active next to any others; `set_adapter` chooses among them. `bias="all"`
    or `"lora_only"` also trains the biases of all linears or of the targeted ones, as peft's `bias`.
    The base is frozen unless `freeze_base=false`.
    """

    name = "lora"
    options = LoraOptions
    peft_type = "LORA"
    site_kinds = ("linear", "conv", "embedding")

    def check(self, gm: fx.GraphModule, site: Any, options: LoraOptions) -> None:
        if site.kind == "embedding" and options.dora:
            raise OptionError(f"lora: dora is not supported on embedding {site.path!r}; exclude it from targets")
        if site.kind == "conv":
            if options.dora:
                raise OptionError(f"lora: dora on convolution {site.path!r} is not implemented; exclude it from targets")
            if options.r % site.groups:
                raise OptionError(f"lora: r={options.r} must be divisible by the groups ({site.groups}) of {site.path!r}, as in peft")
            if any(d != 1 for d in site.dilation):
                raise OptionError(f"lora: {site.path!r} is a dilated convolution, which peft's LoRA does not support")

    def params(self, ctx: Context) -> list[Param]:
        site, o = ctx.site, ctx.options
        if site.kind == "embedding":
            return [Param("lora_embedding_A", (o.r, site.num_embeddings)),
                    Param("lora_embedding_B", (site.embedding_dim, o.r), init=nn.init.normal_)]
        init = kaiming_uniform if o.init == "kaiming" else (lambda t: nn.init.normal_(t, std=1 / o.r))
        if site.kind == "conv":
            ones = (1,) * site.dims
            params = [Param("lora_A", (o.r, site.in_channels, *site.kernel_size), init=init, suffix="weight"),
                      Param("lora_B", (site.out_channels, o.r // site.groups, *ones), suffix="weight")]
        else:
            params = [Param("lora_A", (o.r, site.in_features), init=init, suffix="weight"),
                      Param("lora_B", (site.out_features, o.r), suffix="weight")]
        if o.dora:
            norm = torch.linalg.vector_norm(ctx.weight().float(), dim=1).detach()
            params.append(Param("lora_magnitude_vector", value=norm, suffix="weight"))
        return params

    def modules(self, site: Any, options: LoraOptions) -> dict[str, nn.Module]:
        return {"lora_dropout": nn.Dropout(options.dropout)} if options.dropout > 0 and site.kind != "embedding" else {}

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        site, o = b.site, b.options
        s = o.scaling
        if site.kind == "embedding":
            A = b.call(aten.t.default, b.param("lora_embedding_A"), role="lora_embedding_A_t")
            after_a = b.call(aten.embedding.default, A, x, site.padding_idx, role="lora_A_out")
            B = b.call(aten.t.default, b.param("lora_embedding_B"), role="lora_embedding_B_t")
            return b.call(aten.mul.Tensor, b.call(aten.matmul.default, after_a, B, role="lora_B_out"), s, role="scaled")
        if o.dropout > 0:
            x = b.module("lora_dropout", x, role="dropout")
        A, B = b.param("lora_A"), b.param("lora_B")
        if site.kind == "conv":
            conv, d = {1: aten.conv1d, 2: aten.conv2d, 3: aten.conv3d}[site.dims], site.dims
            if isinstance(site.padding, str):
                after_a = b.call(conv.padding, x, A, None, list(site.stride), site.padding, role="lora_A_out")
            else:
                after_a = b.call(conv.default, x, A, None, list(site.stride), list(site.padding), role="lora_A_out")
            after_b = b.call(conv.default, after_a, B, None, [1] * d, [0] * d, [1] * d, site.groups, role="lora_B_out")
            return b.call(aten.mul.Tensor, after_b, s, role="scaled")
        lora_out = b.call(aten.linear.default, b.call(aten.linear.default, x, A, role="lora_A_out"), B, role="lora_B_out")
        if not o.dora:
            return b.call(aten.mul.Tensor, lora_out, s, role="scaled")
        # DoRA, in peft's order of operations (DoraLinearLayer.forward), added to y.
        W = b.weight()
        lora_weight = b.call(aten.mm.default, B, A, role="lora_weight")
        combined = b.call(aten.add.Tensor, W, b.call(aten.mul.Tensor, lora_weight, s, role="scaled_weight"), role="combined")
        norm = b.call(aten.linalg_vector_norm.default, combined, 2, [1], role="weight_norm")
        norm = b.call(aten.detach.default, norm, role="weight_norm_detached")
        mag_norm_scale = b.call(aten.div.Tensor, b.param("lora_magnitude_vector"), norm, role="mag_norm_scale")
        if o.dropout > 0:  # peft recomputes the base output from the dropped-out input
            base = b.call(aten.linear.default, x, W, role="base_dropped")
        elif site.bias is not None:
            base = b.call(aten.sub.Tensor, b.base, b.base_bias(), role="base_without_bias")
        else:
            base = b.base
        first = b.call(aten.mul.Tensor, b.call(aten.sub.Tensor, mag_norm_scale, 1, role="mag_minus_one"), base,
                       role="rescaled_base")
        second = b.call(aten.mul.Tensor, b.call(aten.mul.Tensor, mag_norm_scale, lora_out, role="rescaled_lora"), s,
                        role="scaled")
        return b.call(aten.add.Tensor, first, second, role="dora_out")

    def delta(self, ctx: Context) -> torch.Tensor:
        site, s = ctx.site, ctx.options.scaling
        if site.kind == "embedding":
            return ((ctx.tensor("lora_embedding_B") @ ctx.tensor("lora_embedding_A")) * s).T
        A, B = ctx.tensor("lora_A").float(), ctx.tensor("lora_B").float()
        if site.kind == "conv":
            if site.groups > 1:
                raise NotMergeable(f"lora: {site.path!r} is a grouped convolution, which peft does not merge either")
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[site.dims]
            return conv(A.transpose(0, 1), B).transpose(0, 1) * s
        return (B @ A) * s

    def fold(self, ctx: Context, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        merged = weight + self.delta(ctx)
        if ctx.options.dora:
            merged = merged * (ctx.tensor("lora_magnitude_vector") / torch.linalg.vector_norm(merged, dim=1)).view(-1, 1)
        return merged, bias

    def checkpoint_key(self, key: str) -> str:
        return key.removesuffix(".weight") if key.endswith("lora_magnitude_vector.weight") else key

    def to_peft(self, options: LoraOptions, sites: list[Any]) -> dict[str, Any]:
        return {"r": options.r, "lora_alpha": options.alpha, "lora_dropout": options.dropout, "use_rslora": options.rslora,
                "use_dora": options.dora, "bias": options.bias,
                "init_lora_weights": True if options.init == "kaiming" else "gaussian",
                "fan_in_fan_out": any(getattr(s, "fan_in_fan_out", False) for s in sites)}

    def from_peft(self, config: dict[str, Any]) -> dict[str, Any]:
        init = config.pop("init_lora_weights", True)
        if init not in (True, False, "gaussian"):
            raise OptionError(f"init_lora_weights={init!r} changes the base weights at init, which peftc does not implement")
        config.pop("fan_in_fan_out", None)  # peftc reads the layout from the graph
        config.pop("qalora_group_size", None)  # used only with use_qalora, refused when set
        return {"r": config.pop("r", 8), "alpha": float(config.pop("lora_alpha", 8)),
                "dropout": float(config.pop("lora_dropout", 0.0)), "rslora": bool(config.pop("use_rslora", False)),
                "dora": bool(config.pop("use_dora", False)), "bias": config.pop("bias", "none"),
                "init": "gaussian" if init == "gaussian" else "kaiming"}

    def after_insert(self, gm: fx.GraphModule, sites: list[Any], options: LoraOptions) -> None:
        if options.bias == "none":
            return
        names = [name for name, _ in gm.named_parameters() if name.endswith(".bias")] if options.bias == "all" else [
            s.bias for s in sites if s.kind == "linear" and s.bias]
        for name in names:
            set_tensor(gm, name, nn.Parameter(get_tensor(gm, name).data, requires_grad=True))

    def describe(self, options: LoraOptions, sites: list[Any]) -> str:
        kind = "DoRA" if options.dora else "LoRA"
        return f"{kind} r={options.r} on {len(sites)} sites, adapter {options.adapter!r}"
