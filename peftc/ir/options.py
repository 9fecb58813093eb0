"""Options of passes: frozen dataclasses whose fields declare themselves.

    @dataclass(frozen=True)
    class LoraOptions(AdapterOptions):
        r: int = option(8, doc="rank of A and B", check=positive, aliases=("rank",), peft="r")
        dropout: float = option(0.0, doc="input dropout", check=probability, peft="lora_dropout")

1. Every options class derives from `Options`. Constructing one checks each field against its type
   annotation (int, float, bool, str, Literal choices, unions, tuples) and its `check`; lists become
   tuples and ints become floats where the annotation asks, so options stay hashable however they
   were given. A failure raises `OptionError` naming the pass, the field, the value and what it must
   be.
2. A field made with `option(...)` also carries its doc (the pass reference in docs/passes.md is
   generated from it), the other spellings pipeline text accepts (`aliases`; its HF peft name is
   one), and how it appears in peft's `adapter_config.json`: `peft` (the field's name there),
   `peft_default` (what peft assumes when the field is absent, if not `default`), `encode` /
   `decode` (value <-> JSON value; `decode` raises `OptionError` for a value peftc does not
   implement). The technique layer
   derives a technique's config mapping from these (`peftc.technique.options`).
3. Shared checks: `positive`, `non_negative`, `probability`, `identifier`, `pattern`, `one_of`.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import re
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any, ClassVar

from peftc.errors import OptionError
from peftc.ir.targets import compile_pattern

__all__ = [
    "Options",
    "SAME",
    "OMIT",
    "Spec",
    "option",
    "spec_of",
    "fields_of",
    "default_of",
    "positive",
    "non_negative",
    "probability",
    "identifier",
    "pattern",
    "one_of",
    "fits",
    "coerce",
    "type_name",
]

# None when the value is fine, else what it must be ("a positive integer")
Check = Callable[[Any], "str | None"]


class _Same:
    def __repr__(self) -> str:
        return "the default"


SAME = _Same()  # `peft_default`: peft assumes the field's own default
OMIT = object()  # what an `encode` returns for a field adapter_config.json does not hold


@dataclass(frozen=True)
class Spec:
    """What a field declares besides its type and default (see the module doc, case 2)."""

    doc: str = ""
    check: Check | None = None
    aliases: tuple[str, ...] = ()
    peft: str | None = None
    peft_default: Any = SAME
    encode: Callable[[Any], Any] | None = None
    decode: Callable[[Any], Any] | None = None


def option(
    default: Any,
    *,
    doc: str = "",
    check: Check | None = None,
    aliases: tuple[str, ...] = (),
    peft: str | None = None,
    peft_default: Any = SAME,
    encode: Callable[[Any], Any] | None = None,
    decode: Callable[[Any], Any] | None = None,
) -> Any:
    """A field of an options dataclass with its doc, checks and HF peft mapping."""
    spec = Spec(doc, check, tuple(aliases), peft, peft_default, encode, decode)
    return dataclasses.field(default=default, metadata={"peftc": spec})


def spec_of(f: dataclasses.Field) -> Spec:
    return f.metadata.get("peftc", _NO_SPEC)


_NO_SPEC = Spec()


def fields_of(cls: type) -> list[dataclasses.Field]:
    """The fields a user sets (those `__init__` takes)."""
    return [f for f in dataclasses.fields(cls) if f.init]


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


@dataclass(frozen=True)
class Options:
    """Base of every options dataclass: fields are type-checked, coerced and checked on
    construction."""

    # the pass these options belong to, for messages; set by register_pass
    __pass__: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        owner = type(self).__pass__ or type(self).__name__
        for f in fields_of(type(self)):
            value, hint = getattr(self, f.name), hints[f.name]
            if not fits(value, hint):
                raise OptionError(
                    f"option {f.name!r} of pass {owner!r} must be {type_name(hint)}, got "
                    f"{type(value).__name__} {value!r}"
                )
            coerced = coerce(value, hint)
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
            check = spec_of(f).check
            problem = check(coerced) if check is not None and coerced is not None else None
            if problem:
                raise OptionError(f"{owner}: {f.name} must be {problem}, got {coerced!r}")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


# --- shared checks ------------------------------------------------------------------------------


def positive(value: Any) -> str | None:
    return None if value > 0 else "a positive integer" if isinstance(value, int) else "positive"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "zero or more"


def probability(value: Any) -> str | None:
    return None if 0.0 <= value < 1.0 else "in [0, 1)"


def identifier(value: Any) -> str | None:
    ok = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value)
    return None if ok else "an identifier (it becomes part of parameter names)"


def pattern(value: Any) -> str | None:
    """A target pattern: globs separated by `|`, a `re:` regex, or `all-linear`."""
    if value == "all-linear":
        return None
    try:
        compile_pattern(value)
    except Exception as e:
        return f"a target pattern ({e})"
    return None


def one_of(*choices: Any) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else "one of " + ", ".join(map(repr, choices))

    return check


# --- types ------------------------------------------------------------------------------------


def fits(value: Any, tp: Any) -> bool:
    """Whether `value` is of the annotated type `tp` (ints pass for floats, lists for tuples)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list) or tp in (tuple, list):
        return isinstance(value, (tuple, list)) and _members_fit(value, tp)
    if origin is dict:
        key, item = typing.get_args(tp) or (Any, Any)
        return isinstance(value, dict) and all(
            fits(k, key) and fits(v, item) for k, v in value.items()
        )
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _members_fit(value: tuple | list, tp: Any) -> bool:
    """`tuple[T, ...]` and `list[T]`: every member a T; `tuple[A, B]`: one member of each."""
    args = typing.get_args(tp)
    if not args:
        return True
    if typing.get_origin(tp) is list or (len(args) == 2 and args[1] is Ellipsis):
        return all(fits(v, args[0]) for v in value)
    return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args, strict=True))


def coerce(value: Any, tp: Any) -> Any:
    """Lists become tuples (options stay hashable), ints become floats where only a float fits."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and not fits(value, _without(tp, float))
    ):
        return float(value)
    return value


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


def _without(tp: Any, drop: type) -> Any:
    """`tp` as if `drop` were not among its alternatives (None where nothing else is left)."""
    if tp is drop:
        return type(None)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not drop]
        return functools.reduce(operator.or_, rest) if rest else type(None)
    return tp


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if origin in (tuple, list, dict):
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))
