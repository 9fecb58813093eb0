"""Which sites a pass acts on: its kinds, its `targets`, and peft's default targets per
architecture."""

from __future__ import annotations

from typing import Any

from torch import fx

from peftc._peft import peft_module
from peftc.errors import OptionError
from peftc.ir.graph import peftc_meta
from peftc.ir.targets import names_pattern, select
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

__all__ = ["sites_of", "resolve_sites", "default_targets", "family_entry", "peft_table"]


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


def peft_table(name: str, pass_name: str) -> dict[str, list[str]]:
    """peft's per-family table `TRANSFORMERS_MODELS_TO_<name>_MODULES_MAPPING` (`LORA_TARGET`,
    `IA3_FEEDFORWARD`, ...), read from the installed peft."""
    try:
        constants = peft_module("peft.utils.constants")
    except ImportError:
        raise OptionError(
            f"{pass_name}: the default targets are peft's per-family table, and peft is not "
            "installed: pip install 'peftc[hf]', or pass targets=\"...\""
        ) from None
    return getattr(constants, f"TRANSFORMERS_MODELS_TO_{name}_MODULES_MAPPING", None) or {}


def family_entry(gm: fx.GraphModule, table: dict[str, Any]) -> Any:
    """The entry of a per-family `table` for the captured architecture: its config's model_type
    (also of a transformer inside the user's wrapper), else the captured class's module; None."""
    capture = peftc_meta(gm).get("capture", {})
    model_class, model_type = capture.get("class", ""), capture.get("config", {}).get("model_type")
    if model_type in table:
        return table[model_type]
    return next((v for k, v in table.items() if f".models.{k}." in model_class), None)


def default_targets(gm: fx.GraphModule, pass_name: str, table: str = "LORA_TARGET") -> str:
    """peft's default targets (its `table`) for the captured architecture, as a pattern."""
    names = family_entry(gm, peft_table(table, pass_name))
    if not names:
        model_class = peftc_meta(gm).get("capture", {}).get("class") or "this model"
        raise OptionError(
            f'{pass_name}: peft has no default targets for {model_class}; pass targets="..." '
            "(a glob such as '*.q_proj|*.v_proj', a 're:' regex, or 'all-linear')"
        )
    return names_pattern(names)


def resolve_sites(
    gm: fx.GraphModule,
    targets: str | None,
    name: str,
    kinds: tuple[str, ...] = ("linear",),
    table: str = "LORA_TARGET",
) -> list[WeightSite | SublayerSite]:
    """The sites of `kinds` that `targets` selects for pass `name` (None: the architecture's entry
    in peft's `table`); an empty selection is an error."""
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
