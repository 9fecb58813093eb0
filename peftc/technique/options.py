"""What every technique's options share, and how options map to HF peft's `adapter_config.json`.

The mapping is derived from the options' fields (`peftc.ir.options.option`), never restated:

1. `to_peft(technique, options, sites)`: `peft_type`, `target_modules` (the paths of the sites the
   adapter acts on, where the options' `targets` maps to it), every field declaring a `peft` name
   (encoded), the technique's `peft_fixed` fields, then its own `to_peft` extras.
2. `from_peft(technique, config)`: the technique's `from_peft` extras first, then every declared
   field (decoded; absent fields take peft's default), `peft_fixed` fields at their value and
   `peft_ignored` ones are consumed; any other field that is not at a neutral value (None, false, 0,
   empty) is refused by name, so an option peftc does not implement is never ignored.
3. A dotted peft name (`use_bdlora.nblocks`) is a key of a nested config (peft's sub-configs of a
   variant): written as `None` while every field of the group is at its default, as peft writes an
   unused variant; read from the nested dict, whose leftover keys are refused like any other.
4. `option_rows(options)`: the rows of the options table in docs/passes.md.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass
from typing import Any, Literal

from torch import fx

from peftc.errors import CheckpointError, OptionError
from peftc.ir.graph import peftc_meta
from peftc.ir.options import (
    OMIT,
    SAME,
    Options,
    default_of,
    fields_of,
    identifier,
    option,
    pattern,
    positive,
    probability,
    spec_of,
    type_name,
)
from peftc.ir.targets import names_pattern

__all__ = [
    "AdapterOptions",
    "PatternOptions",
    "at_site",
    "in_layers",
    "rank_option",
    "dropout_option",
    "to_peft",
    "from_peft",
    "peft_task_type",
    "targets_from_peft",
    "neutral",
    "option_rows",
    "METADATA",
]

# Fields about where a config came from, not what the adapter computes.
METADATA = (
    "peft_type",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "megatron_core",
)


def targets_from_peft(target_modules: Any) -> str:
    """peft's target_modules (a regex string, or names matched as whole paths or path suffixes) as a
    pattern."""
    if isinstance(target_modules, str):
        return f"re:{target_modules}"
    if (
        not target_modules
        or not isinstance(target_modules, (list, tuple))
        or not all(isinstance(name, str) for name in target_modules)
    ):
        raise OptionError(
            "target_modules must name the adapted modules (a list of names or a regex), got "
            f"{target_modules!r}"
        )
    return names_pattern(target_modules)


@dataclass(frozen=True)
class AdapterOptions(Options):
    """Options every technique has. Subclass with the technique's own fields (all with defaults)."""

    targets: str | None = option(
        None,
        doc="module paths to adapt: globs separated by `|`, a `re:` regex, `all-linear`, or a list "
        "of names as peft's target_modules (each the whole path or its end after a dot); None: "
        "peft's default for the architecture",
        check=pattern,
        peft="target_modules",
        decode=targets_from_peft,
    )
    adapter: str = option(
        "default",
        doc="the adapter's name; several adapters live in one graph",
        check=identifier,
        aliases=("adapter_name",),
    )
    freeze_base: bool = option(
        True, doc="freeze every base parameter, as peft's get_peft_model does"
    )
    modules_to_save: tuple[str, ...] | str = option(
        (),
        doc="modules the adapter trains a copy of (a classifier head), named by the end of their "
        "path as in peft; their sites are not adapted",
        peft="modules_to_save",
        encode=lambda v: ([v] if isinstance(v, str) else list(v)) or None,
        decode=lambda v: tuple(v or ()),
    )
    exclude_modules: tuple[str, ...] | str | None = option(
        None,
        doc="sites left out: names matched as the whole path or its last parts, or a regex "
        "matched against the whole path",
        peft="exclude_modules",
        encode=lambda v: OMIT,  # the adapted paths are written as target_modules
    )
    autocast_adapter_dtype: bool = option(
        True,
        doc="on a float16/bfloat16 model, keep the adapter's tensors in float32 and compute with "
        "them as peft does (get_peft_model's autocast_adapter_dtype); false: the model's dtype",
    )
    layers_to_transform: tuple[int, ...] | int | None = option(
        None,
        doc="adapt only these layers: the first number in a site's path (after a "
        "`layers_pattern` name), as peft",
        peft="layers_to_transform",
        encode=lambda v: OMIT if v is None else v if isinstance(v, int) else list(v),
    )
    layers_pattern: tuple[str, ...] | str | None = option(
        None,
        doc="the name before the layer number (`layers`, `h`) for layers_to_transform",
        peft="layers_pattern",
        encode=lambda v: OMIT if v is None else v if isinstance(v, str) else list(v),
    )
    task_type: Literal["SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"] | str | None = option(
        None,
        doc="peft's task type; SEQ_CLS and TOKEN_CLS also save `classifier` / `score`, "
        "QUESTION_ANS `qa_outputs` (modules_to_save)",
        peft="task_type",
    )


def _pairs(value: tuple) -> str | None:
    ok = all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in value)
    return None if ok else "[pattern, value] pairs (peft: a dict)"


def _pattern(peft: str, what: str) -> Any:
    return option(
        (),
        doc=f"[regex, {what}] pairs: a site whose path ends with the regex (the first that "
        f"matches) takes that {what}, as peft's {peft}",
        check=_pairs,
        peft=peft,
        encode=dict,
        decode=lambda v: tuple((v or {}).items()),
    )


@dataclass(frozen=True)
class PatternOptions(AdapterOptions):
    """Options with peft's per-site rank and alpha (LoRA, LoHa, LoKr): `r` and `alpha` at a site
    come from the first pattern its path matches (`at_site`)."""

    rank_pattern: tuple[tuple[str, int], ...] = _pattern("rank_pattern", "rank")
    alpha_pattern: tuple[tuple[str, float], ...] = _pattern("alpha_pattern", "alpha")


def _matching(pairs: tuple, key: str) -> Any:
    """peft's get_pattern_key: the value of the first pattern `key` ends with (after a dot)."""
    return next((v for p, v in pairs if re.match(rf"(.*\.)?({p})$", key)), None)


def at_site(options: Any, key: str) -> Any:
    """`options` at the site peft names `key` (its module path): r and alpha from the patterns."""
    if not isinstance(options, PatternOptions):
        return options
    r, alpha = _matching(options.rank_pattern, key), _matching(options.alpha_pattern, key)
    changed = {k: v for k, v in (("r", r), ("alpha", alpha)) if v is not None}
    return dataclasses.replace(options, **changed) if changed else options


def unmatched_patterns(options: Any, keys: list[str]) -> list[str]:
    """The rank_pattern / alpha_pattern keys that match none of `keys` (peft warns and ignores
    them)."""
    if not isinstance(options, PatternOptions):
        return []
    pairs = options.rank_pattern + options.alpha_pattern
    return [p for p, _ in pairs if not any(_matching(((p, 1),), k) for k in keys)]


def in_layers(options: Any, path: str) -> bool:
    """peft's layers_to_transform / layers_pattern: whether `path` is in a chosen layer (the first
    number after a `layers_pattern` name, else after any name)."""
    chosen = options.layers_to_transform
    if chosen is None or chosen == ():
        return True
    names = options.layers_pattern
    names = [names] if isinstance(names, str) else list(names or ())
    patterns = [rf"(?:^|.*?\.){n}\.(?P<idx>\d+)\." for n in names] or [
        r".*?\.[^.]*\.(?P<idx>\d+)\."
    ]
    match = next((m for m in (re.match(p, path) for p in patterns) if m), None)
    if match is None:
        return False
    index = int(match["idx"])
    return index == chosen if isinstance(chosen, int) else index in chosen


def rank_option(default: int, doc: str) -> Any:
    """A positive rank, peft's `r` (pipelines also take `rank=`)."""
    return option(default, doc=doc, check=positive, aliases=("rank",), peft="r")


def dropout_option(peft: str, doc: str = "dropout on the branch's input") -> Any:
    """A dropout probability in [0, 1), off by default, peft's field `peft`."""
    return option(0.0, doc=doc, check=probability, peft=peft)


def peft_task_type(gm: fx.GraphModule) -> str:
    """peft's task_type for the captured model's class (what `PeftModel.from_pretrained` builds)."""
    name = peftc_meta(gm).get("capture", {}).get("class", "")
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return "FEATURE_EXTRACTION"


def to_peft(technique: Any, options: Any, sites: list[Any]) -> dict[str, Any]:
    """`adapter_config.json` of an adapter of `technique` with `options` acting at `sites` (case
    1)."""
    gm = sites[0].node.graph.owning_module if sites else None
    name_or_path = (
        peftc_meta(gm).get("capture", {}).get("config", {}).get("name_or_path")
        if gm is not None
        else None
    )
    config: dict[str, Any] = {
        "peft_type": technique.peft_type,
        "task_type": None,
        "base_model_name_or_path": name_or_path or None,
        "inference_mode": True,
    }
    groups: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    for f in fields_of(type(options)):
        spec = spec_of(f)
        if spec.peft == "target_modules":
            config["target_modules"] = sorted({s.path for s in sites})
        elif spec.peft is not None:
            value = getattr(options, f.name)
            encoded = spec.encode(value) if spec.encode else _json(value)
            group, _, key = spec.peft.rpartition(".")
            if encoded is OMIT:
                continue
            if group:
                groups.setdefault(group, {})[key] = encoded
                if value != default_of(f):
                    used.add(group)
            else:
                config[spec.peft] = encoded
    config.update({group: values if group in used else None for group, values in groups.items()})
    config.update(technique.peft_fixed)
    config.update(technique.to_peft(options, sites))
    return config


def from_peft(
    technique: Any,
    config: dict[str, Any],
    where: str,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, Any]:
    """Options of `technique` from a peft config (case 2) and its checkpoint's tensor shapes;
    `where` names the file in errors."""
    fields = {k: v for k, v in config.items() if k not in METADATA}
    try:
        options = {**technique.from_peft(fields), **technique.from_shapes(fields, shapes or {})}
        for f in fields_of(technique.options):
            spec = spec_of(f)
            if spec.peft is None or f.name in options:
                continue
            group, _, key = spec.peft.rpartition(".")
            holder = fields.get(group) if group else fields
            if isinstance(holder, dict) and key in holder:
                raw = holder.pop(key)
                options[f.name] = spec.decode(raw) if spec.decode else raw
            elif spec.peft_default is not SAME:
                options[f.name] = spec.peft_default
            if group and not fields.get(group, True):  # read whole, or written as None (unused)
                fields.pop(group)
    except OptionError as e:
        raise CheckpointError(f"{where}: {e}") from None
    for key, value in technique.peft_fixed.items():
        if fields.get(key, value) == value:
            fields.pop(key, None)
    for key in technique.peft_ignored:
        group, _, name = key.rpartition(".")
        holder = fields.get(group) if group else fields
        if isinstance(holder, dict):
            holder.pop(name, None)
        if group and fields.get(group) == {}:
            fields.pop(group)
    refused = {k: v for k, v in fields.items() if not neutral(v)}
    if refused:
        named = ", ".join(f"{k}={v!r}" for k, v in refused.items())
        raise CheckpointError(
            f"{where}: the config sets {named}, which peftc does not implement for "
            f"{technique.name}; retrain without it, or load the adapter with peft"
        )
    return options


def neutral(value: Any) -> bool:
    """A config value that changes nothing: unset, false, zero, empty (peft's defaults for unused
    options)."""
    if isinstance(value, dict):
        return all(neutral(v) for v in value.values())
    return value is None or value is False or value == 0 or value in ("", "none") or value == []


def option_rows(options: type | None) -> list[tuple[str, str, str, str, str]]:
    """(option, type, default, peft's name, meaning) for each field of an options dataclass."""
    if options is None:
        return []
    hints = typing.get_type_hints(options)
    rows = []
    for f in fields_of(options):
        spec = spec_of(f)
        spellings = ", ".join(f"`{a}`" for a in spec.aliases if a != spec.peft)
        doc = spec.doc + (f" (also: {spellings})" if spellings else "")
        rows.append(
            (
                f"`{f.name}`",
                f"`{type_name(hints[f.name])}`",
                f"`{default_of(f)!r}`",
                f"`{spec.peft}`" if spec.peft else "",
                doc,
            )
        )
    return rows


def _json(value: Any) -> Any:
    """A value as JSON holds it (tuples as lists); anything else is refused by name."""
    value = json.loads(json.dumps(value)) if isinstance(value, tuple) else value
    try:
        json.dumps(value)
    except TypeError as e:
        raise CheckpointError(
            f"option value {value!r} cannot be written to adapter_config.json ({e})"
        ) from None
    return value
