"""Registering passes, their typed options, and what a pass returns.

A pass is a plain function `(gm, options) -> PassResult` (or `(gm) -> PassResult` when it
has no options), registered by name:

    @register_pass("lora", options=LoraOptions)
    def lora(gm: fx.GraphModule, options: LoraOptions) -> PassResult: ...

Options are a dataclass: field types are checked when a pipeline is built, and
`__post_init__` checks ranges with `peftc.errors.OptionError`.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from peftc.errors import OptionError, suggest

__all__ = ["PassResult", "PassInfo", "register_pass", "get_pass", "registered_passes", "make_options", "options_to_dict"]


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
    name: str, *, options: type | None = None, preserves_outputs: bool = False, replace: bool = False
) -> Callable[[Callable[..., PassResult]], Callable[..., PassResult]]:
    """Register a pass under `name` (usable in pipeline text).

    `preserves_outputs=True` declares that the pass never changes what the module computes;
    the numeric check (`check_numerics=True`) then compares outputs before and after it.
    `replace=True` overrides an existing registration instead of raising.
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise OptionError(f"pass name {name!r} must be a Python identifier, e.g. 'my_pass'")
    if options is not None and not dataclasses.is_dataclass(options):
        raise OptionError(f"options of pass {name!r} must be a dataclass, got {options!r}")

    def decorate(fn: Callable[..., PassResult]) -> Callable[..., PassResult]:
        if name in _REGISTRY and not replace and _REGISTRY[name].fn is not fn:
            raise OptionError(f"a pass named {name!r} is already registered; pick another name or pass replace=True")
        _REGISTRY[name] = PassInfo(name, fn, options, preserves_outputs, inspect.cleandoc(fn.__doc__ or ""))
        return fn

    return decorate


def get_pass(name: str) -> PassInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        parts = [f"no pass named {name!r}.", suggest(name, _REGISTRY), f"Registered passes: {', '.join(sorted(_REGISTRY))}"]
        raise OptionError(" ".join(p for p in parts if p)) from None


def registered_passes() -> dict[str, PassInfo]:
    return dict(sorted(_REGISTRY.items()))


# peft's config names for options peftc spells differently: accepted as the option they name
_PEFT_SPELLINGS = {"rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
                   "num_virtual_tokens": "n", "adapter_name": "adapter", "use_dora": "dora", "use_rslora": "rslora"}


def make_options(info: PassInfo, given: dict[str, Any]) -> Any:
    """Build `info`'s options dataclass from `given`, checking names and types."""
    if info.options is None:
        if given:
            raise OptionError(f"pass {info.name!r} takes no options, got {', '.join(given)}")
        return None
    hints = typing.get_type_hints(info.options)
    fields = {f.name: f for f in dataclasses.fields(info.options) if f.init}
    given = {(_PEFT_SPELLINGS[k] if k not in fields and _PEFT_SPELLINGS.get(k) in fields and _PEFT_SPELLINGS[k] not in given
              else k): v for k, v in given.items()}
    for key, value in given.items():
        if key not in fields:
            parts = [f"pass {info.name!r} has no option {key!r}.", suggest(key, fields), f"Its options: {', '.join(fields)}"]
            raise OptionError(" ".join(p for p in parts if p))
        if not _fits(value, hints[key]):
            raise OptionError(
                f"option {key!r} of pass {info.name!r} must be {_type_name(hints[key])}, "
                f"got {type(value).__name__} {value!r}"
            )
    return info.options(**{k: _coerce(v, hints[k]) for k, v in given.items()})


def options_to_dict(options: Any, *, include_defaults: bool = False) -> dict[str, Any]:
    """Options as a plain dict; by default only the values that differ from the defaults."""
    if options is None:
        return {}
    out = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING
        )
        if include_defaults or value != default:
            out[f.name] = value
    return out


def _fits(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return isinstance(value, (tuple, list)) and all(_fits(v, args[0]) for v in value) if args else True
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _coerce(value: Any, tp: Any) -> Any:
    """Lists from pipeline text become tuples, so options stay hashable and frozen."""
    if isinstance(value, list):
        return tuple(value)
    if tp is float and isinstance(value, int):
        return float(value)
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))
