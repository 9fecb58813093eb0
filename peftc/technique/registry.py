"""The table of techniques: how the core reaches a technique without importing it.

`register_technique` (in `peftc.technique.adapters`, which also makes the pass) fills it after
`check_declaration` has refused, before anything changes, a declaration that is incomplete or whose
name or peft type another technique holds.
"""

from __future__ import annotations

from typing import Any

from peftc.errors import OptionError
from peftc.ir.options import fields_of
from peftc.ir.registry import check_pass_name
from peftc.technique.declaration import STAGES, Technique
from peftc.technique.options import AdapterOptions

__all__ = ["technique", "techniques", "for_peft_type", "peft_types", "check_declaration", "add"]

_TECHNIQUES: dict[str, Technique] = {}


def technique(name: str) -> Technique:
    try:
        return _TECHNIQUES[name]
    except KeyError:
        raise OptionError(
            f"no technique named {name!r}; registered: {', '.join(sorted(_TECHNIQUES))}"
        ) from None


def techniques() -> dict[str, Technique]:
    return dict(_TECHNIQUES)


def peft_types() -> dict[str, Technique]:
    """peft type -> the technique that loads its checkpoints."""
    return {t: m for m in _TECHNIQUES.values() for t in _loads(m) if t}


def _loads(method: Any) -> tuple[str | None, ...]:
    return method.peft_loads if method.peft_loads is not None else (method.peft_type,)


def for_peft_type(peft_type: str) -> Technique | None:
    return peft_types().get(peft_type)


def check_declaration(cls: type[Technique], replace: bool) -> None:
    """Refuse a declaration that is incomplete, or that takes a name or a peft type another
    technique holds."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str):
        raise OptionError(
            f'technique {cls.__name__} needs a `name` (its pass name), e.g. name = "my_technique"'
        )
    options = getattr(cls, "options", None)
    if not (isinstance(options, type) and issubclass(options, AdapterOptions)):
        raise OptionError(
            f"technique {name!r}: `options` must be a frozen dataclass deriving "
            f"peftc.technique.AdapterOptions, got {options!r}"
        )
    if cls.stage not in STAGES:
        raise OptionError(f"technique {name!r}: stage {cls.stage!r} is none of {', '.join(STAGES)}")
    check_pass_name(name, options, replace and name in _TECHNIQUES)
    holders = peft_types()
    for peft_type in _loads(cls):
        holder = holders.get(peft_type) if peft_type else None
        if holder is not None and holder.name != name:
            raise OptionError(
                f"technique {name!r} loads peft_type {peft_type!r}, which technique "
                f"{holder.name!r} already loads; a checkpoint must map to one technique (give one "
                "of them another peft_type, or none)"
            )
    peft_names = [f.metadata["peftc"].peft for f in fields_of(options) if "peftc" in f.metadata]
    doubled = {p for p in peft_names if p and peft_names.count(p) > 1}
    if doubled:
        raise OptionError(
            f"technique {name!r}: several options declare peft's field {sorted(doubled)[0]!r}"
        )


def add(method: Technique) -> None:
    _TECHNIQUES[method.name] = method
