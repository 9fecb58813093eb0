"""Adaption prompt (LLaMA-Adapter): learned prompts attended through a zero-init gate in the top
attention layers, as HF peft's ADAPTION_PROMPT.

    y = sdpa(q, k, v) + g * softmax(q P_k^T / sqrt(d)) P_v,   P_k = k_proj(P), P_v = v_proj(P)

1. Sites are the last `adapter_layers` attention sites (kind `sdpa`) whose module path ends with
   `target_modules` (peft's `self_attn`), in graph order, as peft takes the last parents.
2. Each site has `adaption_prompt` (1, adapter_len, hidden), N(0, 1), and `adaption_gate` (1,),
   zero: at init the model computes what the base did. peft's keys are
   `base_model.model.<path>.adaption_{prompt,gate}`, without the adapter name.
3. The prompt's keys and values are the site's own `k_proj` / `v_proj` (with their biases) applied
   to P, without rotary; GQA repeats each key/value head per query head (`repeat_interleave`). q is
   the rotated query SDPA reads; the softmax runs in float32 and is cast back, as peft's.
4. peft adds `o_proj(adapter)` to `o_proj(attention)`; with o_proj linear and bias-free this is the
   term added to SDPA's output before o_proj. An o_proj bias (peft would add it twice) and GPT-2's
   fused `c_attn` are refused by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from peftc.errors import OptionError, PassError
from peftc.sites.regions import AttentionSite, attention_sites
from peftc.sites.weight import LinearSite, linear_sites
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    identifier,
    option,
    positive,
    register_technique,
)
from peftc.technique.options import peft_task_type

__all__ = ["AdaptionPromptOptions", "AdaptionPrompt"]

aten = torch.ops.aten
_PROJECTIONS = ("k_proj", "v_proj", "o_proj")
# AdapterOptions fields peft's AdaptionPromptConfig has no counterpart of
_UNSUPPORTED = ("targets", "exclude_modules", "layers_to_transform", "layers_pattern")


@dataclass(frozen=True)
class AdaptionPromptOptions(AdapterOptions):
    adapter_len: int = option(
        10,
        doc="prompt tokens per adapted layer (peft has no default)",
        check=positive,
        peft="adapter_len",
    )
    adapter_layers: int = option(
        30,
        doc="adapted attention layers, counted from the top (peft has no default)",
        check=positive,
        peft="adapter_layers",
    )
    target_modules: str = option(
        "self_attn", doc="the attention modules' name, as peft's target_modules", check=identifier
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (*_UNSUPPORTED, "modules_to_save"):
            if getattr(self, name):
                raise OptionError(
                    f"adaption_prompt: {name} is not supported (peft's AdaptionPromptConfig has "
                    "no such field); choose layers with adapter_layers and target_modules"
                )


def _projections(gm: fx.GraphModule, site: AttentionSite) -> dict[str, LinearSite]:
    """The site's k_proj, v_proj, o_proj linear sites, as peft reads them from the module."""
    found = {s.path: s for s in linear_sites(gm) if s.path.startswith(f"{site.path}.")}
    projections = {name: found.get(f"{site.path}.{name}") for name in _PROJECTIONS}
    missing = [name for name, s in projections.items() if s is None]
    if missing:
        raise PassError(
            f"adaption_prompt: {site.path} has no {missing}: peft adapts Llama/Mistral attention "
            "(q_proj, k_proj, v_proj, o_proj); GPT-2's fused c_attn is not implemented"
        )
    return projections  # type: ignore[return-value]


def _check_site(gm: fx.GraphModule, site: AttentionSite) -> None:
    proj = _projections(gm, site)
    if any(s.storage != "dense" for s in proj.values()):
        raise PassError(f"adaption_prompt: quantized projections at {site.path} not implemented")
    if proj["o_proj"].bias is not None:
        raise PassError(
            f"adaption_prompt: {site.path}.o_proj has a bias, which peft adds a second time "
            "(o_proj of the prompt's output): not implemented"
        )
    k = proj["k_proj"]
    heads, kv_heads, head_dim = site.num_heads, site.num_kv_heads, site.head_dim
    if None in (heads, kv_heads, head_dim) or (
        k.out_features != kv_heads * head_dim
        or k.in_features // k.out_features != heads // kv_heads
    ):
        raise PassError(
            f"adaption_prompt: {site.path}'s heads ({heads}, {kv_heads} key/value, head_dim "
            f"{head_dim}) do not match k_proj ({k.in_features} -> {k.out_features}) as peft "
            "assumes"
        )


@register_technique
class AdaptionPrompt(Technique):
    """LLaMA-Adapter: a gated prompt attended at the top attention layers, peft's
    ADAPTION_PROMPT."""

    name, options, peft_type = "adaption_prompt", AdaptionPromptOptions, "ADAPTION_PROMPT"
    site_kinds = ("sdpa",)
    stage = "output"
    exclusive = True  # peft swaps one adapter's modules in at a time
    mergeable = False  # peft does not merge it: an attention term, not a weight update
    half_precision = "base"  # peft makes them in q_proj's dtype

    def select(self, gm: fx.GraphModule, options: AdaptionPromptOptions) -> list[tuple[Any, str]]:
        name = options.target_modules
        sites = [s for s in attention_sites(gm) if s.path.rpartition(".")[2] == name]
        if len(sites) < options.adapter_layers:
            raise PassError(
                f"adaption_prompt: adapter_layers={options.adapter_layers} but the graph has "
                f"{len(sites)} attention sites named {name!r} (peft refuses it too)"
            )
        sites = sites[-options.adapter_layers :]
        for site in sites:
            _check_site(gm, site)
        return [(site, site.path) for site in sites]

    def params(self, ctx: Context) -> list[Param]:
        hidden = _projections(ctx.gm, ctx.site)["k_proj"].in_features
        prompt = Param("adaption_prompt", (1, ctx.options.adapter_len, hidden), nn.init.normal_)
        return [prompt, Param("adaption_gate", (1,))]  # zero gate: "zero-init attention"

    def build(self, b: Builder, y: fx.Node) -> fx.Node:
        site: AttentionSite = b.site
        prompt, dtype = b.param("adaption_prompt"), site.query.meta["val"].dtype
        key, value = (_prompt_heads(b, prompt, name) for name in ("k_proj", "v_proj"))
        keys_t = b.call(aten.transpose.int, key, -1, -2, role="prompt_keys_t")
        if b.ctx.tensor("adaption_prompt").dtype != dtype:  # peft: .to(query's dtype)
            keys_t = b.call(aten._to_copy.default, keys_t, role="prompt_keys_cast", dtype=dtype)
        scores = b.call(aten.matmul.default, site.query, keys_t, role="prompt_scores")
        scores = b.call(aten.div.Tensor, scores, math.sqrt(site.head_dim), role="prompt_scaled")
        as_f32 = b.call(aten._to_copy.default, scores, role="scores_f32", dtype=torch.float32)
        probs = b.call(aten._softmax.default, as_f32, -1, False, role="prompt_softmax")
        probs = b.call(aten._to_copy.default, probs, role="probs_cast", dtype=dtype)
        gated = b.call(aten.mul.Tensor, b.param("adaption_gate"), probs, role="gated")
        term = b.call(aten.matmul.default, gated, value, role="prompt_output")
        return b.call(aten.add.Tensor, y, term, role="with_prompt")

    def to_peft(self, options: AdaptionPromptOptions, sites: list[Any]) -> dict[str, Any]:
        gm = sites[0].node.graph.owning_module
        return {
            "target_modules": options.target_modules,
            "task_type": options.task_type or peft_task_type(gm),
        }

    def from_peft(self, config: dict[str, Any]) -> dict[str, Any]:
        name = config.pop("target_modules", None)
        return {"target_modules": name} if name is not None else {}

    def describe(self, options: AdaptionPromptOptions, sites: list[Any]) -> str:
        return (
            f"{options.adapter_len} prompt tokens gated at the top {len(sites)} attention sites, "
            f"adapter {options.adapter!r}"
        )


def _prompt_heads(b: Builder, prompt: fx.Node, name: str) -> fx.Node:
    """(heads, adapter_len, head_dim): the prompt through the site's `name` projection, each
    key/value head repeated per query head as peft's repeat_interleave."""
    site: AttentionSite = b.site
    proj = _projections(b.gm, site)[name]
    bias = b.get(proj.bias, f"{name}_bias") if proj.bias else None
    weight = b.get(proj.weight, f"{name}_weight")
    flat = b.call(aten.linear.default, prompt, weight, bias, role=f"prompt_{name}")
    n, kv_heads = b.options.adapter_len, site.num_kv_heads
    view = b.call(aten.reshape.default, flat, [n, kv_heads, site.head_dim], role=f"{name}_view")
    heads = b.call(aten.transpose.int, view, 0, 1, role=f"{name}_heads")
    factor = site.num_heads // kv_heads
    if factor == 1:
        return heads
    return b.call(aten.repeat_interleave.self_int, heads, factor, 0, role=f"{name}_repeat")
