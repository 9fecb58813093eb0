"""Registering passes, their typed options, and what a pass returns.

A pass is a plain function `(gm, options) -> PassResult` (or `(gm) -> PassResult` when it
has no options), registered by name:

    @register_pass("lora", options=LoraOptions)
    def lora(gm: fx.GraphModule, options: LoraOptions) -> PassResult: ...

Options are a dataclass, best derived from `peftc.ir.options.Options` with fields made by
`option(...)`: types and checks run on construction, and the pass reference shows each field's
doc. Pipeline text may spell a field by any name it declares (`rank` for `r`, peft's `lora_alpha`).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from peftc.errors import OptionError, suggest
from peftc.ir.options import Options, coerce, default_of, fields_of, fits, spec_of, type_name

__all__ = [
    "PassResult",
    "PassInfo",
    "register_pass",
    "check_pass_name",
    "get_pass",
    "registered_passes",
    "make_options",
    "options_to_dict",
]


@dataclass(frozen=True)
class PassResult:
    """What a pass did. A pass fills `graph_module`, `modified`, `sites` and `report`;
    the pass manager fills the statistics."""

    graph_module: fx.GraphModule
    modified: bool
    sites: tuple[str, ...] = ()
    report: str = ""
    name: str = ""
    nodes_added: int = 0
    nodes_removed: int = 0
    params_added: tuple[str, ...] = ()
    params_removed: tuple[str, ...] = ()
    seconds: float = 0.0


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: Callable[..., PassResult]
    options: type | None
    preserves_outputs: bool
    doc: str = field(repr=False)

    def make_options(self, given: dict[str, Any]) -> Any:
        return make_options(self, given)


_REGISTRY: dict[str, PassInfo] = {}


def register_pass(
    name: str,
    *,
    options: type | None = None,
    preserves_outputs: bool = False,
    replace: bool = False,
) -> Callable[[Callable[..., PassResult]], Callable[..., PassResult]]:
    """Register a pass under `name` (usable in pipeline text).

    `preserves_outputs=True` declares that the pass never changes what the module computes;
    the numeric check (`check_numerics=True`) then compares outputs before and after it.
    `replace=True` overrides an existing registration instead of raising.
    """
    check_pass_name(name, options, replace)

    def decorate(fn: Callable[..., PassResult]) -> Callable[..., PassResult]:
        if name in _REGISTRY and not replace and _REGISTRY[name].fn is not fn:
            raise OptionError(
                f"a pass named {name!r} is already registered; pick another name or pass "
                "replace=True"
            )
        if options is not None and issubclass(options, Options) and "__pass__" not in vars(options):
            options.__pass__ = name  # messages name the pass
        _REGISTRY[name] = PassInfo(
            name, fn, options, preserves_outputs, inspect.cleandoc(fn.__doc__ or "")
        )
        return fn

    return decorate


def check_pass_name(name: str, options: type | None = None, replace: bool = False) -> None:
    """Refuse, before anything is registered, a name that is no identifier or already taken, or
    options that are no dataclass."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise OptionError(f"pass name {name!r} must be a Python identifier, e.g. 'my_pass'")
    if options is not None and not dataclasses.is_dataclass(options):
        raise OptionError(f"options of pass {name!r} must be a dataclass, got {options!r}")
    if name in _REGISTRY and not replace:
        raise OptionError(
            f"a pass named {name!r} is already registered; pick another name or pass replace=True"
        )


def get_pass(name: str) -> PassInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        parts = [
            f"no pass named {name!r}.",
            suggest(name, _REGISTRY),
            f"Registered passes: {', '.join(sorted(_REGISTRY))}",
        ]
        raise OptionError(" ".join(p for p in parts if p)) from None


def registered_passes() -> dict[str, PassInfo]:
    return dict(sorted(_REGISTRY.items()))


def make_options(info: PassInfo, given: dict[str, Any]) -> Any:
    """Build `info`'s options dataclass from `given`: names (or another spelling a field declares),
    types, checks."""
    if info.options is None:
        if given:
            raise OptionError(f"pass {info.name!r} takes no options, got {', '.join(given)}")
        return None
    fields = {f.name: f for f in fields_of(info.options)}
    spellings = {
        alias: f.name
        for f in fields.values()
        for alias in (*spec_of(f).aliases, spec_of(f).peft)
        if alias and alias not in fields
    }
    hints = typing.get_type_hints(info.options)
    chosen: dict[str, Any] = {}
    for key, value in given.items():
        name = key if key in fields else spellings.get(key)
        if name is None:
            parts = [
                f"pass {info.name!r} has no option {key!r}.",
                suggest(key, fields),
                f"Its options: {', '.join(fields)}",
            ]
            raise OptionError(" ".join(p for p in parts if p))
        if name in chosen:
            raise OptionError(
                f"pass {info.name!r}: option {name!r} is given twice (as {name} and {key})"
            )
        spec = spec_of(fields[name])
        if spec.peft and spec.decode is not None and not fits(value, hints[name]):
            # peft's kind of value under either spelling (targets=[...], target_modules=[...])
            value = spec.decode(value)
        if not fits(value, hints[name]):
            raise OptionError(
                f"option {name!r} of pass {info.name!r} must be {type_name(hints[name])}, got "
                f"{type(value).__name__} {value!r}"
            )
        chosen[name] = coerce(value, hints[name])
    return info.options(**chosen)


def options_to_dict(options: Any, *, include_defaults: bool = False) -> dict[str, Any]:
    """Options as a plain dict; by default only the values that differ from the defaults."""
    if options is None:
        return {}
    out = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if include_defaults or value != default_of(f):
            out[f.name] = value
    return out
