"""Which sites a pass acts on: its kinds, its `targets`, and peft's default targets per
architecture."""

from __future__ import annotations

from typing import Any

from torch import fx

from peftc.errors import OptionError
from peftc.ir.graph import peftc_meta
from peftc.ir.targets import select
from peftc.sites.modules import module_sites
from peftc.sites.parameters import parameter_sites
from peftc.sites.regions import (
    SUBLAYER_KINDS,
    SublayerSite,
    attention_sites,
    final_hidden_states,
    input_embeddings,
    sublayer_sites,
)
from peftc.sites.weight import WeightSite, lm_head, weight_sites

__all__ = ["sites_of", "resolve_sites", "default_targets", "DEFAULT_TARGETS"]


# site kind -> the query finding the sites of that kind (weight kinds: `weight_sites`)
_REGIONS = {
    "tokens": input_embeddings,
    "sdpa": attention_sites,
    "final_hidden": final_hidden_states,
    "module": module_sites,
    "parameter": parameter_sites,
}


def sites_of(gm: fx.GraphModule, kinds: tuple[str, ...], targets: str | None = None) -> list[Any]:
    """The sites of `kinds` a technique acts on (weight, sublayer, `tokens`, `sdpa`, `final_hidden`
    sites, in any mix), in graph order."""
    weight_kinds = tuple(k for k in kinds if k not in SUBLAYER_KINDS and k not in _REGIONS)
    sublayer_kinds = tuple(k for k in kinds if k in SUBLAYER_KINDS)
    found: list[Any] = []
    if weight_kinds:
        found += weight_sites(gm, None, weight_kinds)
    if sublayer_kinds:
        found += sublayer_sites(gm, None, sublayer_kinds)
    for kind in kinds:
        if kind in _REGIONS:
            found += _REGIONS[kind](gm)
    what = " or ".join(kinds) + " site"
    chosen = set(select(targets, [s.path for s in found], what=what))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted((s for s in found if s.path in chosen), key=lambda s: order[s.node])


# peft's default target modules (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING) by class
DEFAULT_TARGETS = {
    "t5": "*.q|*.v",
    "mt5": "*.q|*.v",
    "bart": "*.q_proj|*.v_proj",
    "gpt2": "*.c_attn",
    "bloom": "*.query_key_value",
    "opt": "*.q_proj|*.v_proj",
    "gptj": "*.q_proj|*.v_proj",
    "gpt_neox": "*.query_key_value",
    "gpt_neo": "*.q_proj|*.v_proj",
    "bert": "*.query|*.value",
    "roberta": "*.query|*.value",
    "xlm-roberta": "*.query|*.value",
    "electra": "*.query|*.value",
    "deberta-v2": "*.query_proj|*.value_proj",
    "layoutlm": "*.query|*.value",
    "llama": "*.q_proj|*.v_proj",
    "gpt_bigcode": "*.c_attn",
    "falcon": "*.query_key_value",
    "codegen": "*.qkv_proj",
    "mistral": "*.q_proj|*.v_proj",
    "mixtral": "*.q_proj|*.v_proj",
    "stablelm": "*.q_proj|*.v_proj",
    "phi": "*.q_proj|*.v_proj|*.fc1|*.fc2",
    "gemma": "*.q_proj|*.v_proj",
    "gemma2": "*.q_proj|*.v_proj",
    "gemma3_text": "*.q_proj|*.v_proj",
    "qwen2": "*.q_proj|*.v_proj",
    "qwen3": "*.q_proj|*.v_proj",
}


def default_targets(gm: fx.GraphModule, pass_name: str, table: dict[str, str] | None = None) -> str:
    """peft's default targets for the captured architecture: the config's model_type (also of a
    transformer inside the user's wrapper), else the captured class's module."""
    capture = peftc_meta(gm).get("capture", {})
    model_class, model_type = capture.get("class", ""), capture.get("config", {}).get("model_type")
    table = table or DEFAULT_TARGETS
    if model_type in table:
        return table[model_type]
    for family, pattern in table.items():
        if f".models.{family}." in model_class:
            return pattern
    raise OptionError(
        f'{pass_name}: no default targets for {model_class or "this model"}; pass targets="..." '
        "(a glob such as '*.q_proj|*.v_proj', a 're:' regex, or 'all-linear')"
    )


def resolve_sites(
    gm: fx.GraphModule,
    targets: str | None,
    name: str,
    kinds: tuple[str, ...] = ("linear",),
    table: dict[str, str] | None = None,
) -> list[WeightSite | SublayerSite]:
    """The sites of `kinds` that `targets` selects for pass `name` (None: `table`'s default for the
    architecture, peft's LoRA table by default); an empty selection is an error."""
    if targets == "all-linear":  # peft's: nn.Linear and Conv1D modules but the model's head
        head = lm_head(gm)
        modules = peftc_meta(gm).get("linear_modules")
        sites = [
            s
            for s in weight_sites(gm, kinds=("linear",))
            if (head is None or s.path != head.path) and (modules is None or s.path in modules)
        ]
        if not sites:
            raise OptionError(
                f'{name}: targets="all-linear" selects no linear site in this graph (besides an LM '
                "head)"
            )
        return sites
    pattern = targets or default_targets(gm, name, table)
    return sites_of(gm, kinds, pattern)
