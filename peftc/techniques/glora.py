"""GLoRA: generalized LoRA, updates of the weight and bias that read them, as in HF peft 0.21.

    y = W x + b  ->  y = W x + b + (W ⊙ A + B) x + (b ⊙ D + E + W C)

1. Each support tensor has its own parameterization: A and B (`config_A_B`) are `lora` (Xd Xu, an
   (out, r) times an (r, in) factor), `vector` (out, 1), broadcast along the inputs, `constant`
   (one scalar) or `none`; C (`config_C`) is `lora` ((in, r) times (r, 1)), `vector` (in, 1) or
   `none`; D and E (`config_D_E`) are `vector` (out,), `constant` or `none`.
2. C, D and E act on the bias: at a site without one peft keeps them as zero buffers, saved in its
   checkpoint (`glora_C.zeros`, ...), and so does peftc; so are A and B with `none`.
3. Every adapter reads the original W and b, so several add up, and merging folds them all from the
   originals: W' = W + W ⊙ A + B, b' = b + b ⊙ D + E + W C.
4. `init_weights=true` zeroes each Xd, vector and constant (the identity); false draws them
   Kaiming-uniform (constants N(0, 0.02)), as peft. Each Xu is Kaiming-uniform.
Plain dense nn.Linear sites only, as peft: GPT-2's Conv1D, nn.MultiheadAttention's out_proj, NF4
weights and `bias` other than "none" are refused by name, and so are float16/bfloat16 bases with
autocast_adapter_dtype (peft computes in the base's dtype from float32 tensors; without it both
keep every tensor in the base's dtype).
Tensors: `<path>.glora_A.<adapter>.Xd` / `.Xu` / `.X` / `.zeros`, likewise B, C, D, E.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn

from peftc.errors import OptionError
from peftc.ir.graph import get_tensor, peftc_meta
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    kaiming_uniform,
    option,
    rank_option,
    register_technique,
)
from peftc.techniques.oft import eager

__all__ = ["GloraOptions", "Glora"]

aten = torch.ops.aten
LINEAR = "torch.nn.modules.linear.Linear"  # peft's GLoRA takes exactly this type


@dataclass(frozen=True)
class GloraOptions(AdapterOptions):
    r: int = rank_option(8, "rank of the `lora` parameterizations")
    config_A_B: Literal["lora", "vector", "constant", "none"] = option(
        "lora",
        doc="A and B (W' = W + W ⊙ A + B): lora, vector, constant or none",
        peft="config_A_B",
    )
    config_C: Literal["lora", "vector", "none"] = option(
        "lora", doc="C (b' = b + W C): lora, vector or none", peft="config_C"
    )
    config_D_E: Literal["vector", "constant", "none"] = option(
        "constant", doc="D and E (b' = b + b ⊙ D + E): vector, constant or none", peft="config_D_E"
    )
    init_weights: bool = option(
        True,
        doc="start at the identity (Xd, vectors, constants zero); false: drawn at random",
        peft="init_weights",
    )


def _row_kaiming(tensor: torch.Tensor) -> None:
    # peft draws a 1-d vector as one row: fan_in is its length
    kaiming_uniform(tensor.unsqueeze(0))


def _constant_normal(tensor: torch.Tensor) -> None:
    nn.init.normal_(tensor, mean=0.0, std=0.02)


def _path(name: str, kind: str, shape: tuple[int, int], r: int, random: bool) -> list[Param]:
    """peft's path `glora_<name>` of `kind` for a (rows, cols) support tensor."""
    rows, cols = shape

    def param(suffix: str, size: tuple[int, ...], init: Any, **more: Any) -> Param:
        return Param(f"glora_{name}", size, init, suffix=suffix, key=f"{name}.{suffix}", **more)

    if kind == "lora":
        down = param("Xd", (rows, r), kaiming_uniform if random else None)
        return [down, param("Xu", (r, cols), kaiming_uniform)]
    if kind == "vector":
        size, init = ((rows, 1), kaiming_uniform) if cols else ((rows,), _row_kaiming)
        return [param("X", size, init if random else None)]
    if kind == "constant":
        return [param("X", (1,), _constant_normal if random else None)]
    return [param("zeros", (rows, cols) if cols else (rows,), None, trainable=False)]


def _support(call: Any, get: Any, name: str, kind: str) -> Any:
    """The support tensor (`get(key)` reads a tensor): Xd Xu, or X (a (1,) constant broadcasts as
    peft's scalar)."""
    if kind == "lora":
        down, up = get(f"{name}.Xd"), get(f"{name}.Xu")
        return call(aten.mm.default, down, up, role=f"glora_{name}")
    return get(f"{name}.X")


def _weight_update(call: Any, get: Any, W: Any, o: GloraOptions) -> Any:
    """W ⊙ A + B, or None with config_A_B="none"."""
    if o.config_A_B == "none":
        return None
    scaled = call(aten.mul.Tensor, W, _support(call, get, "A", o.config_A_B), role="W_A")
    return call(aten.add.Tensor, scaled, _support(call, get, "B", o.config_A_B), role="dW")


def _bias_update(call: Any, get: Any, W: Any, bias: Any, o: GloraOptions) -> Any:
    """b ⊙ D + E + W C, peft's order of terms; None where the site has no bias or both are off."""
    terms = []
    if bias is not None and o.config_D_E != "none":
        D, E = (_support(call, get, name, o.config_D_E) for name in "DE")
        terms += [call(aten.mul.Tensor, bias, D, role="b_D"), E]
    if bias is not None and o.config_C != "none":
        WC = call(aten.mm.default, W, _support(call, get, "C", o.config_C), role="W_C")
        terms.append(call(aten.squeeze.dim, WC, -1, role="W_C_flat"))
    if not terms:
        return None
    total = terms[0]
    for term in terms[1:]:
        total = call(aten.add.Tensor, total, term, role="db")
    return total


@register_technique
class Glora(Technique):
    """Insert GLoRA: `y = W x + b -> y + (W ⊙ A + B) x + b ⊙ D + E + W C`."""

    name, options, peft_type = "glora", GloraOptions, "GLORA"
    peft_fixed = {"bias": "none"}
    preserves_outputs = False  # init_weights=false changes the model at init

    def check(self, gm: fx.GraphModule, site: Any, options: GloraOptions) -> None:
        found = peftc_meta(gm).get("module_types", {}).get(site.path) or "unknown"
        if found != LINEAR:
            raise OptionError(
                f"glora: {site.path!r} has type {found}, and peft's GLoRA adapts plain "
                "torch.nn.Linear layers only; exclude it from targets"
            )
        if site.storage != "dense":
            raise OptionError(
                f"glora: {site.path!r} stores its weight as {site.storage!r}; peft's GLoRA adapts "
                "plain dense nn.Linear layers only; keep the site dense or exclude it"
            )

    def params(self, ctx: Context) -> list[Param]:
        o, site = ctx.options, ctx.site
        out, inp, random = site.out_features, site.in_features, not o.init_weights
        biased = bool(site.bias)
        return [
            *_path("A", o.config_A_B, (out, inp), o.r, random),
            *_path("B", o.config_A_B, (out, inp), o.r, random),
            *_path("C", o.config_C if biased else "none", (inp, 1), o.r, random),
            *_path("D", o.config_D_E if biased else "none", (out, 0), o.r, random),
            *_path("E", o.config_D_E if biased else "none", (out, 0), o.r, random),
        ]

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        o, W = b.options, b.weight()
        dW = _weight_update(b.call, b.param, W, o)
        db = _bias_update(b.call, b.param, W, b.base_bias(), o)
        if dW is not None:  # peft: linear(x, W', b') - linear(x, W, b)
            return b.call(aten.linear.default, x, dW, db, role="glora")
        if db is not None:
            return db
        return b.call(aten.zeros_like.default, b.base, role="glora")  # every path is off

    def fold(
        self, ctx: Context, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # from the original W and b, as peft merges several adapters
        o, W = ctx.options, ctx.weight().float()
        base_bias = get_tensor(ctx.gm, ctx.site.bias).float() if ctx.site.bias else None

        def get(key: str) -> torch.Tensor:
            return ctx.tensor(key).float()

        dW = _weight_update(eager, get, W, o)
        db = _bias_update(eager, get, W, base_bias, o)
        weight = weight if dW is None else weight + dW.to(weight.dtype)
        return weight, bias if db is None else bias + db.to(bias.dtype)

    def describe(self, options: GloraOptions, sites: list[Any]) -> str:
        o = options
        return (
            f"GLoRA A/B={o.config_A_B} C={o.config_C} D/E={o.config_D_E} r={o.r} on "
            f"{len(sites)} sites, adapter {o.adapter!r}"
        )
