"""peft's `all-linear` on mixture-of-experts families, as peft 0.21 spells it out on transformers 5.

Where transformers 5 fused a family's experts into stacked parameters and made its router a module
of its own (Mixtral, Qwen2-MoE: the families of peft's `transformers_weight_conversion` tables),
peft's all-linear still means the linears the family had before: the router's `gate.weight` and
the experts become `target_parameters`, the fused gate-and-up stack gets rank and alpha times the
projections fused into it (`rank_pattern`), and a linear whose name is an expert projection's (a
shared expert's `down_proj`) is left out, as in peft. The tables are read from the installed peft.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import fx

from peftc._peft import peft_module
from peftc.errors import OptionError
from peftc.ir.graph import peftc_meta
from peftc.sites.selection import resolve_sites
from peftc.technique.options import targets_from_peft

__all__ = ["all_linear"]


def all_linear(gm: fx.GraphModule, options: Any) -> Any:
    """`options` with targets="all-linear" written as peft writes it for this graph's family."""
    tables = _peft_tables(gm)
    if tables is None:
        return options
    mapping, fused = tables
    leaves = {site.path.rpartition(".")[2] for site in resolve_sites(gm, "all-linear", "lora")}
    modules, parameters = set(), set(options.target_parameters or ())
    matched: dict[str, set[str]] = {new: set() for new in fused}
    for leaf in sorted(leaves | set(mapping)):
        if leaf not in mapping:
            modules.add(leaf)
            continue
        parameters.add(mapping[leaf])
        matched.setdefault(mapping[leaf], set()).add(leaf)
    ranks, alphas = list(options.rank_pattern), list(options.alpha_pattern)
    for new, olds in fused.items():
        if len(olds) > 1 and matched.get(new) == set(olds):
            key = rf".*\.{re.escape(new)}"
            ranks.append((key, options.r * len(olds)))
            alphas.append((key, options.alpha * len(olds)))
    return dataclasses.replace(
        options,
        targets=targets_from_peft(sorted(modules)) if modules else "none",
        target_parameters=tuple(sorted(parameters)),
        rank_pattern=tuple(ranks),
        alpha_pattern=tuple(alphas),
    )


def _peft_tables(gm: fx.GraphModule) -> tuple[dict, dict] | None:
    """(v4 name -> v5 target, fused v5 target -> its v4 names) for this graph's family, from peft;
    None where peft has no conversion for it."""
    model_type = peftc_meta(gm).get("capture", {}).get("config", {}).get("model_type")
    try:
        conversion = peft_module("peft.utils.transformers_weight_conversion")
    except ImportError:
        if any(t.endswith("Experts") for t in peftc_meta(gm).get("module_types", {}).values()):
            raise OptionError(
                'lora: targets="all-linear" on a mixture-of-experts model means what peft\'s '
                "tables say for its family (experts and router as target_parameters); install "
                "peft to read them, or name the targets"
            ) from None
        return None
    family = conversion._MODEL_TO_CONVERSION_PATTERN.get(model_type)
    mapping = conversion._MOE_TARGET_MODULE_MAPPING.get(family)
    return (mapping, conversion._MOE_FUSED_TARGETS.get(family, {})) if mapping else None
