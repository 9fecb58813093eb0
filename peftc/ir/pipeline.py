"""Pipelines: an ordered list of passes, written as text or built in code.

Text is Python call syntax, parsed with `ast`:

    nf4(blocksize=64), lora(r=8, alpha=16, targets="*.q_proj|*.v_proj"), merge

`str(Pipeline.parse(text))` prints the canonical form (options equal to their
defaults dropped), and parsing that again gives an equal pipeline.
"""

from __future__ import annotations

import ast
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import fx

from peftc.errors import (
    OptionError,
    PassError,
    PeftcError,
    PipelineSyntaxError,
    UnknownPassError,
    VerificationError,
    suggest,
)
from peftc.ir import verify as checks
from peftc.ir.graph import clone, peftc_meta
from peftc.ir.registry import PassInfo, PassResult, get_pass, options_to_dict, registered_passes

__all__ = ["Step", "Pipeline", "PipelineResult", "apply"]

_LITERAL_NAMES = {
    "true": True,
    "false": False,
    "none": None,
    "True": True,
    "False": False,
    "None": None,
}


@dataclass(frozen=True)
class Step:
    """One pass of a pipeline with its validated options (None when it has none)."""

    name: str
    options: Any = None

    @classmethod
    def make(cls, name: str, options: dict[str, Any] | None = None) -> Step:
        info = get_pass(name)
        return cls(name, info.make_options(dict(options or {})))

    def __str__(self) -> str:
        given = options_to_dict(self.options)
        if not given:
            return self.name
        return f"{self.name}({', '.join(f'{k}={_format_value(v)}' for k, v in given.items())})"


@dataclass(frozen=True)
class PipelineResult:
    graph_module: fx.GraphModule
    results: tuple[PassResult, ...]

    def __str__(self) -> str:
        rows = [("pass", "modified", "sites", "+nodes", "-nodes", "+params", "-params", "ms")]
        for r in self.results:
            rows.append(
                (
                    r.name,
                    "yes" if r.modified else "no",
                    str(len(r.sites)),
                    str(r.nodes_added),
                    str(r.nodes_removed),
                    str(len(r.params_added)),
                    str(len(r.params_removed)),
                    f"{r.seconds * 1e3:.1f}",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
        ]
        reports = [f"{r.name}: {r.report}" for r in self.results if r.report]
        return "\n".join(lines + reports)


class Pipeline:
    """An ordered sequence of `Step`s.

    Build one from text (`Pipeline.parse`) or in code:
    `Pipeline(["freeze", ("lora", {"r": 8}), Step.make("dce")])`.
    """

    def __init__(self, steps: Iterable[Step | str | tuple[str, dict[str, Any]]] = ()):
        self.steps: tuple[Step, ...] = tuple(_as_step(s) for s in steps)

    @classmethod
    def parse(cls, text: str) -> Pipeline:
        if not isinstance(text, str):
            raise OptionError(f"pipeline text must be a string, got {type(text).__name__}")
        if not text.strip():
            return cls(())
        source = text.strip()
        if len(source) > MAX_PIPELINE_CHARS:
            raise OptionError(
                f"pipeline text is {len(source):,} characters; at most {MAX_PIPELINE_CHARS:,} are "
                "read (a pipeline is a few passes)"
            )
        try:
            # Parenthesised so that passes may sit on indented lines; line numbers shift by one.
            tree = ast.parse(f"(\n{source}\n)", mode="eval")
        except (RecursionError, MemoryError):
            raise OptionError("pipeline text is nested too deeply to read") from None
        except SyntaxError as wrapped:
            line, column, msg = _syntax_error_position(source, wrapped)
            raise PipelineSyntaxError(
                f"pipeline is not valid call syntax: {msg}",
                source,
                line,
                column,
                'write passes as name or name(option=value), separated by commas, e.g. "freeze, '
                'lora(r=8)"',
            ) from None
        body = tree.body
        items = body.elts if isinstance(body, ast.Tuple) else [body]
        return cls(_parse_step(item, source) for item in items)

    def __str__(self) -> str:
        return ", ".join(str(s) for s in self.steps)

    def __repr__(self) -> str:
        return f"Pipeline.parse({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and self.steps == other.steps

    def __hash__(self) -> int:
        return hash(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __add__(self, other: Pipeline) -> Pipeline:
        return Pipeline(self.steps + other.steps)

    def run(
        self,
        gm: fx.GraphModule,
        *,
        verify: bool = True,
        check_numerics: bool = False,
        inplace: bool = False,
    ) -> PipelineResult:
        """Run every step on `gm` (a copy sharing its tensors unless `inplace`).

        After each pass: `recompile`, and with `verify` (the default) `graph.lint()` and
        fake-tensor shape propagation; with `check_numerics`, passes that declare
        `preserves_outputs` must leave the outputs on the example inputs unchanged.
        """
        if not isinstance(gm, fx.GraphModule):
            raise PassError(
                f"a pipeline runs on a captured torch.fx.GraphModule, got {type(gm).__name__}; "
                "call peftc.capture(model, args=...) first"
            )
        if not inplace:
            gm = clone(gm)
        results: list[PassResult] = []
        for step in self.steps:
            result = _run_step(step, gm, [r.name for r in results], verify, check_numerics)
            gm = result.graph_module
            results.append(result)
            peftc_meta(gm).setdefault("history", []).append(
                {
                    "pass": str(step),
                    "modified": result.modified,
                    "sites": list(result.sites),
                    "seconds": result.seconds,
                    "report": result.report,
                }
            )
        return PipelineResult(gm, tuple(results))


def apply(
    gm: fx.GraphModule,
    pipeline: str | Pipeline,
    *,
    verify: bool = True,
    check_numerics: bool = False,
    inplace: bool = False,
) -> fx.GraphModule:
    """Run `pipeline` (text or `Pipeline`) on `gm` and return the rewritten module.

    `gm` is left as it was unless `inplace=True`; the result shares its weight tensors.
    Per-pass results are kept in `result.meta["peftc"]["history"]`.
    """
    if isinstance(pipeline, str):
        pipeline = Pipeline.parse(pipeline)
    if not isinstance(pipeline, Pipeline):
        raise OptionError(
            f"pipeline must be text or a peftc.Pipeline, got {type(pipeline).__name__}"
        )
    return pipeline.run(
        gm, verify=verify, check_numerics=check_numerics, inplace=inplace
    ).graph_module


def _run_step(
    step: Step, gm: fx.GraphModule, ran: Sequence[str], verify: bool, check_numerics: bool
) -> PassResult:
    info = get_pass(step.name)
    nodes_before = {n.name for n in gm.graph.nodes}
    node_ids_before = set(gm.graph.nodes)
    modules_before = {id(m) for m in gm.modules()}
    params_before = {name for name, _ in gm.named_parameters()}
    reference = checks.example_outputs(gm) if check_numerics and info.preserves_outputs else None
    start = time.perf_counter()
    result = _call_pass(info, step, gm, f"after {', '.join(ran)}" if ran else "as the first pass")
    seconds = time.perf_counter() - start
    out = result.graph_module
    _tag_new_nodes(out, node_ids_before, step.name)
    for module in out.modules():  # what a pass adds follows the graph's train/eval mode
        if id(module) not in modules_before:
            module.train(out.training)
    _check_result(out, step.name, verify, reference)
    nodes_after = {n.name for n in out.graph.nodes}
    params_after = {name for name, _ in out.named_parameters()}
    return replace(
        result,
        name=str(step),
        nodes_added=len(nodes_after - nodes_before),
        nodes_removed=len(nodes_before - nodes_after),
        params_added=tuple(sorted(params_after - params_before)),
        params_removed=tuple(sorted(params_before - params_after)),
        seconds=seconds,
    )


def _call_pass(info: PassInfo, step: Step, gm: fx.GraphModule, position: str) -> PassResult:
    """The pass's result; its failures name the pass and where it ran in the pipeline."""
    try:
        result = info.fn(gm) if info.options is None else info.fn(gm, step.options)
    except PeftcError as e:
        if hasattr(e, "add_note"):  # Python >= 3.11
            e.add_note(f"in pass {step.name!r}, run {position}")
        raise
    except Exception as e:
        raise PassError(
            f"pass {step.name!r}, run {position}, failed: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(result, PassResult):
        raise PassError(
            f"pass {step.name!r} returned {type(result).__name__}; a pass must return "
            "peftc.PassResult(gm, modified)"
        )
    if not result.modified and not result.report:
        raise PassError(
            f"pass {step.name!r} changed nothing and did not say why; "
            'return PassResult(gm, modified=False, report="<the reason>")'
        )
    return result


def _check_result(out: fx.GraphModule, name: str, verify: bool, reference: Any) -> None:
    """The rewritten graph lints, compiles, propagates shapes and computes `reference` (if any)."""
    if verify:
        checks.lint(out, name)
    try:
        out.recompile()
    except Exception as e:
        raise VerificationError(
            f"pass {name!r} left a graph whose code does not compile: {e}"
        ) from e
    if verify:
        checks.propagate_shapes(out, name)
    if reference is not None:
        checks.compare_outputs(reference, checks.example_outputs(out), name)


def _tag_new_nodes(gm: fx.GraphModule, before: set[fx.Node], pass_name: str) -> None:
    """Tag what a pass added without a tag: as base computation, so site queries still see it."""
    for n in gm.graph.nodes:
        if n not in before and "peftc" not in n.meta:
            n.meta["peftc"] = {"pass": pass_name, "role": "inserted", "base": True}


def _as_step(step: Step | str | tuple[str, dict[str, Any]]) -> Step:
    if isinstance(step, Step):
        return step
    if isinstance(step, str):
        return Step.make(step)
    if (
        isinstance(step, tuple)
        and len(step) == 2
        and isinstance(step[0], str)
        and isinstance(step[1], dict)
    ):
        return Step.make(*step)
    raise OptionError(
        f"a pipeline step is a pass name, (name, options dict) or peftc.Step, got {step!r}"
    )


def _syntax_error_position(source: str, wrapped: SyntaxError) -> tuple[int, int, str]:
    """Line, column and message of a syntax error in the user's text, not in our wrapper."""
    line_count = len(source.splitlines())
    if wrapped.lineno is not None and 2 <= wrapped.lineno <= line_count + 1:
        return wrapped.lineno - 1, max((wrapped.offset or 1) - 1, 0), wrapped.msg
    try:  # the wrapper's brackets hid the real problem (an unclosed bracket): parse the text bare
        ast.parse(source, mode="eval")
    except SyntaxError as bare:
        return min(max(bare.lineno or 1, 1), line_count), max((bare.offset or 1) - 1, 0), bare.msg
    return 1, 0, wrapped.msg


def _parse_step(node: ast.expr, source: str) -> Step:
    def fail(
        problem: str,
        at: ast.AST,
        hint: str = "",
        cls: type[PipelineSyntaxError] = PipelineSyntaxError,
    ) -> PipelineSyntaxError:
        return cls(
            problem, source, getattr(at, "lineno", 2) - 1, getattr(at, "col_offset", 0), hint
        )

    if isinstance(node, ast.Name):
        name, keywords = node.id, []
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name, keywords = node.func.id, node.keywords
        if node.args:
            raise fail(
                f"options of {name!r} must be named",
                node.args[0],
                f"write {name}(option=value), e.g. lora(r=8)",
            )
    else:
        raise fail(
            "expected a pass name or name(option=value)", node, 'e.g. "freeze, lora(r=8, alpha=16)"'
        )
    passes = registered_passes()
    if name not in passes:
        at = node.func if isinstance(node, ast.Call) else node
        hint = " ".join(
            p for p in (suggest(name, passes), f"Registered passes: {', '.join(passes)}") if p
        )
        raise fail(f"unknown pass {name!r}", at, hint, UnknownPassError)
    given: dict[str, Any] = {}
    for kw in keywords:
        if kw.arg is None:
            raise fail("'**' is not allowed in pipeline text", kw.value, "spell each option out")
        if kw.arg in given:
            raise fail(f"option {kw.arg!r} is given twice", kw, "keep one of them")
        given[kw.arg] = _literal(kw.value, fail)
    try:
        return Step.make(name, given)
    except OptionError as e:
        at = next((kw for kw in keywords if kw.arg in str(e)), node)
        located = fail(str(e), at)
        raise OptionError(str(located)) from None


def _literal(node: ast.expr, fail: Any) -> Any:
    if isinstance(node, ast.Name) and node.id in _LITERAL_NAMES:
        return _LITERAL_NAMES[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, fail) for e in node.elts]
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        raise fail(
            "option values must be literals",
            node,
            'use numbers, "strings", true/false, none or [lists]',
        ) from None
    if isinstance(value, (float, complex)) and not (
        isinstance(value, float) and math.isfinite(value)
    ):
        raise fail(f"{value!r} is not a finite number", node, "give a finite real number")
    return value


MAX_PIPELINE_CHARS = 10_000


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    return repr(value)
