"""Capture an nn.Module as the one IR peftc rewrites: a runnable, trainable torch.fx GraphModule.

Two flavours give passes the same view (every node carries `module_path` and
`module_type`, every value node a fake tensor in `meta["val"]`):

1. `method="export"`: `torch.export.export(..., strict=False)` with dynamic batch and
   sequence dimensions. Real Hugging Face models only capture this way.
2. `method="symbolic"`: `torch.fx.symbolic_trace`, for plain modules without
   data-dependent control flow; leaf modules stay `call_module` nodes.

`"auto"` exports when example inputs are given and traces symbolically otherwise.
The model itself is never modified; the captured module shares its weight tensors.
"""

from __future__ import annotations

import functools
import inspect
import linecache
import operator
import time
import traceback
import warnings
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from peftc.errors import CaptureError
from peftc.ir.attention import use_causal_kernel
from peftc.ir.canonical import canonicalize
from peftc.ir.graph import clone, peftc_meta, set_tensor
from peftc.ir.verify import mark_propagated

__all__ = ["capture", "export_program"]

Method = Literal["auto", "export", "symbolic"]


def capture(
    model: nn.Module,
    args: tuple[Any, ...] | Any = (),
    kwargs: dict[str, Any] | None = None,
    *,
    method: Method = "auto",
    dynamic: bool = True,
    verify: bool = True,
) -> fx.GraphModule:
    """Capture `model` called as `model(*args, **kwargs)` and return a GraphModule.

    `args`/`kwargs` are example inputs. With `dynamic=True` (the default, export only)
    dimensions 0 and 1 of every input tensor (batch, sequence) stay symbolic, so the
    result runs on other batch sizes and lengths; give examples whose batch and length
    are at least 2 and differ, or they get specialised. `use_cache=False` is passed to
    models whose forward takes `use_cache` unless you pass it yourself. With `verify=True` (the
    default) the graph and the model run once on the examples (in the model's mode, from one
    seed), and any output that differs is a `CaptureError` naming it: a graph that computes
    something else is never handed back.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(
            f"capture needs a torch.nn.Module, got {type(model).__name__}; wrap it in one"
        )
    if not isinstance(args, tuple):
        args = (args,)
    kwargs = dict(kwargs or {})
    method = _method(method, bool(args or kwargs))
    start = time.perf_counter()
    if method == "export":
        gm = _export(model, args, kwargs, dynamic)
    else:
        gm = _symbolic(model, args, kwargs)
    _record(gm, model, method, time.perf_counter() - start)
    _follow_modes(gm, model)
    # `x @ W.T (+ b)` becomes a linear site like nn.Linear
    peftc_meta(gm)["capture"]["canonicalized"] = canonicalize(gm)
    mark_propagated(gm)
    if verify and (args or kwargs):
        _check_against_eager(model, gm, args, _call_kwargs(model, kwargs, method))
    return gm


def _follow_modes(gm: fx.GraphModule, model: nn.Module) -> None:
    """The graph's mode is the model's, and each module the graph keeps (dropout, leaf modules)
    is in the mode of the model's module at its path: a model in training mode may hold an
    encoder in eval mode."""
    gm.train(model.training)
    modes = {path: m.training for path, m in model.named_modules()}
    for path, module in gm.named_modules():
        if path in modes:
            module.training = modes[path]


def _record(gm: fx.GraphModule, model: nn.Module, method: str, seconds: float) -> None:
    """What passes read about the model beside the graph."""
    meta = peftc_meta(gm)
    meta["capture"] = {
        "method": method,
        "seconds": seconds,
        "class": _qualname(type(model)),
        # what passes cannot read from the graph (tokenizer, limits)
        "config": _config_summary(model),
        # a transformers model that generates text token by token (None: not a transformers model)
        "causal_lm": _causal_lm(model),
    }
    meta["module_types"] = _module_types(model)
    # each transformers model's config, by path: what a technique builds a like module from
    meta["configs"] = _configs(model)
    # transformers' experts declared `is_transposed` store their weights (experts, in, out)
    meta["transposed_experts"] = [
        path for path, m in model.named_modules() if getattr(m, "is_transposed", False) is True
    ]
    # what peft's all-linear reads: the nn.Linear / Conv1D modules, and the model's own head
    meta["linear_modules"] = [path for path, m in model.named_modules() if _is_linear(m)]
    meta["output_embeddings"] = _output_embeddings(model)
    meta["full_precision"] = _full_precision(model)
    meta["history"] = []


def _full_precision(model: nn.Module) -> list[str]:
    """The modules transformers keeps unquantized when it loads the model in 4 bits (its head, its
    last module, tied weights): `get_keys_to_not_convert`; none for other models. Its key for the
    last module names its last parameter, a bias too (BERT's classifier), which would keep
    nothing: the module is meant."""
    try:
        from transformers import PreTrainedModel
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:
        return []
    if not isinstance(model, PreTrainedModel):
        return []
    return sorted({key.removesuffix(".bias") for key in get_keys_to_not_convert(model)})


def _causal_lm(model: nn.Module) -> bool | None:
    can_generate = getattr(model, "can_generate", None)
    if not callable(can_generate) or not hasattr(model, "config"):
        return None
    return bool(can_generate()) and not getattr(model.config, "is_encoder_decoder", False)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _output_embeddings(model: nn.Module) -> str | None:
    """The path of the module `model.get_output_embeddings()` returns (a transformers model's LM
    head), if any."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None
    return next((path for path, m in model.named_modules() if m is head), None)


def _call_kwargs(model: nn.Module, kwargs: dict, method: str) -> dict:
    """The keywords a capture calls `model` with: `use_cache=False` added for export (to a
    multimodal transformers model too, which passes it on to its language model in `**kwargs`)."""
    parameters = inspect.signature(model.forward).parameters
    text_config = getattr(getattr(model, "config", None), "get_text_config", lambda: None)()
    passes_on = any(p.kind is p.VAR_KEYWORD for p in parameters.values()) and hasattr(
        text_config, "use_cache"
    )
    if (
        method == "export"
        and ("use_cache" in parameters or passes_on)
        and "use_cache" not in kwargs
    ):
        return {**kwargs, "use_cache": False}
    return dict(kwargs)


@torch.no_grad()
def _check_against_eager(model: nn.Module, gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """Run both on the examples in the model's mode, from one seed (the RNG left as it was); raise
    on the first output that differs beyond float rounding."""
    if any(p.device.type == "meta" for p in model.parameters()):
        return
    inputs = peftc_meta(gm)["example_inputs"]  # both flavours keep them, by placeholder
    with torch.random.fork_rng():  # one seed for both: in training mode they draw the same masks
        torch.manual_seed(0)
        expected = pytree.tree_flatten_with_path(model(*args, **kwargs))[0]
        torch.manual_seed(0)
        got = pytree.tree_flatten(gm(*inputs.values()))[0]
    expected = [(p, v) for p, v in expected if isinstance(v, torch.Tensor)]
    got = [v for v in got if isinstance(v, torch.Tensor)]
    if len(got) != len(expected):
        raise CaptureError(
            f"the captured graph of {type(model).__name__} returns {len(got)} tensors where the "
            f"model returns {len(expected)}; capture(..., verify=False) returns it anyway"
        )
    for (path, want), have in zip(expected, got, strict=True):
        problem = _differs(have, want)
        if problem:
            raise CaptureError(
                f"the captured graph of {type(model).__name__} computes another output "
                f"{pytree.keystr(path) or '(the output)'} than the model on the example inputs: "
                f"{problem}. torch.export traced something else than eager runs (often a branch "
                "on a config flag or a custom op); capture(..., verify=False) returns the graph "
                "anyway, for inspection"
            )


def _differs(got: torch.Tensor, expected: torch.Tensor) -> str | None:
    if got.shape != expected.shape:
        return f"shape {tuple(got.shape)}, the model's {tuple(expected.shape)}"
    if not expected.is_floating_point():
        return None if torch.equal(got, expected) else "other values"
    # float32 sums in another order move outputs by ~1e-6 of their scale; half precision by more
    tol = 1e-2 if expected.dtype in (torch.float16, torch.bfloat16) else 1e-3
    nan = expected.isnan()
    if not torch.equal(got.isnan(), nan):
        return "NaN where the model has a number, or the reverse"
    got, expected = got.float().masked_fill(nan, 0), expected.float().masked_fill(nan, 0)
    diff = torch.where(got == expected, 0.0, got - expected).abs().max().item()
    bound = tol * max(1.0, expected.abs().max().item())
    return f"max |difference| {diff:.3g} > {bound:.3g}" if diff > bound else None


def _method(method: str, has_inputs: bool) -> str:
    if method not in ("auto", "export", "symbolic"):
        raise CaptureError(f"unknown capture method {method!r}; use 'export', 'symbolic' or 'auto'")
    if method == "export" and not has_inputs:
        raise CaptureError(
            "method='export' needs example inputs: capture(model, args=(input_ids,))"
        )
    if method == "auto":
        return "export" if has_inputs else "symbolic"
    return method


def export_program(
    gm: fx.GraphModule, args: tuple | None = None, *, dynamic: bool = True
) -> torch.export.ExportedProgram:
    """Export a captured (and rewritten) module again as an ExportedProgram, called positionally
    with `args` (default: its example inputs), e.g. to `torch.export.save` it."""
    if args is None:
        inputs = peftc_meta(gm).get("example_inputs")
        if not inputs:
            raise CaptureError(
                "this module has no example inputs to export with; capture it with args=(...) first"
            )
        args = tuple(inputs.values())
    args = _standalone(args)
    shapes = tuple(_dynamic_spec(a) for a in args) if dynamic else None
    try:
        return torch.export.export(gm, args, dynamic_shapes=shapes, strict=False)
    except Exception as e:
        raise CaptureError(
            _failure_message(gm, e, "torch.export (re-export of the rewritten graph)")
        ) from e


# --- torch.export flavour -----------------------------------------------------------------


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> fx.GraphModule:
    args, kwargs = _standalone((args, _call_kwargs(model, kwargs, "export")))
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise CaptureError(
            f"example inputs do not fit {type(model).__name__}.forward{signature}: {e}"
        ) from e
    dynamic_shapes = _dynamic_shapes(bound) if dynamic else None
    # flags (`use_cache=False`, `output_attentions=False`) are bound into the call, so that those
    # landing in `**kwargs` need no dynamic-shape entry (torch.export cannot match one there)
    flags = {k: v for k, v in kwargs.items() if not _has_tensor(v)}
    tensors = {k: v for k, v in kwargs.items() if k not in flags}
    own_forward = vars(model).get("forward")
    model.forward = functools.partial(model.forward, **flags)
    try:
        exported = torch.export.export(
            model, args, tensors, dynamic_shapes=dynamic_shapes, strict=False
        )
    except Exception as e:
        raise CaptureError(_failure_message(model, e, "torch.export")) from e
    finally:
        if own_forward is None:
            del model.forward
        else:
            model.forward = own_forward
    try:
        unlifted = exported.module(check_guards=False)
    except TypeError:  # torch < 2.9 has no check_guards
        unlifted = exported.module()
    graph = unlifted.graph
    for node in graph.find_nodes(op="call_module"):
        if str(node.target).startswith("_guards"):
            graph.erase_node(node)
    gm = fx.GraphModule(unlifted, graph)
    _keep_every_tensor(gm, unlifted, set(model.state_dict()))
    _mark_module_paths(gm, _module_types(model))
    _dropout_as_modules(gm)
    _attention_dropout_as_modules(gm)
    use_causal_kernel(gm)  # a causal mask runs the causal kernel, as transformers' eager run
    _signature_names(gm, bound)
    _drop_constant_inputs(gm)
    _static_dims(gm, dynamic)
    gm.recompile()
    peftc_meta(gm)["example_inputs"] = _example_inputs(gm, bound)
    return gm


def _keep_every_tensor(gm: fx.GraphModule, unlifted: nn.Module, persistent: set[str]) -> None:
    """GraphModule copies only what the graph reads; keep unused and tied tensors too, so
    state_dict names match the original model's."""
    have = set(gm.state_dict(keep_vars=True))
    for name, p in unlifted.named_parameters(remove_duplicate=False):
        if name not in have:
            set_tensor(gm, name, p)
    for name, b in unlifted.named_buffers(remove_duplicate=False):
        if name not in have or name not in persistent:
            set_tensor(gm, name, b, buffer=True, persistent=name in persistent)


def _mark_module_paths(gm: fx.GraphModule, types: dict[str, str]) -> None:
    """Each node's `module_path` and `module_type`: the innermost module that computes it."""
    for node in gm.graph.nodes:
        stack = _real_stack(node)
        if stack:
            path, kind = stack[-1]
            node.meta["module_path"] = _normalise_path(path)
            node.meta["module_type"] = kind if isinstance(kind, str) else _qualname(kind)
        elif node.op == "get_attr":
            owner = str(node.target).rpartition(".")[0]
            node.meta["module_path"] = owner
            node.meta["module_type"] = types.get(owner, "")
        else:
            node.meta["module_path"] = ""
            node.meta["module_type"] = types.get("", "")


def _standalone(value: Any) -> Any:
    """Tensor views (`ids[:2, :7]`) as copies. torch.export fakifies a view with its base and keeps
    guards on the base (`input_ids._base.size()[1] != ...`); the program's guard function then fails
    on the base-less fake inputs of every later trace (torch.onnx: `'NoneType' has no attribute
    'size'`). A tensor given twice (`labels=input_ids`) is copied too: export would read one input
    for both, and the graph would use the labels as token ids."""
    seen: set[int] = set()

    def own(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        again = id(x) in seen
        seen.add(id(x))
        return x.clone() if again or x._base is not None else x

    return pytree.tree_map(own, value)


def _dynamic_shapes(bound: inspect.BoundArguments) -> dict:
    """Specs by argument name, for the arguments that hold tensors (the flags are bound)."""
    return {
        name: _dynamic_spec(value) for name, value in bound.arguments.items() if _has_tensor(value)
    }


def _has_tensor(value: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


def _dynamic_spec(value: Any) -> Any:
    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return {d: torch.export.Dim.AUTO for d in range(min(x.dim(), 2))}
        return None

    return pytree.tree_map(spec, value)


def _dropout_as_modules(gm: fx.GraphModule) -> None:
    """`aten.dropout(x, p, train)` has its mode baked in; make it an nn.Dropout so train()/eval()
    work."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.dropout.default:
            continue
        x, p = node.args[0], node.args[1]
        owner = node.meta["module_path"]
        target = (
            owner
            if node.meta["module_type"].endswith("Dropout")
            else f"{owner}.dropout".lstrip(".")
        )
        existing = gm.get_submodule(target) if _has_submodule(gm, target) else None
        if existing is not None and not (isinstance(existing, nn.Dropout) and existing.p == p):
            target = f"{target}_{node.name}"
        if existing is None or target != owner:
            gm.add_submodule(target, nn.Dropout(p))
        with gm.graph.inserting_before(node):
            module_call = gm.graph.call_module(target, (x,))
        module_call.meta.update(node.meta)
        node.replace_all_uses_with(module_call)
        gm.graph.erase_node(node)


class TrainingOnly(nn.Module):
    """A probability that holds in training mode only: attention's `dropout_p`, which export bakes
    in as the number it had when captured."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self) -> float:
        return self.p if self.training else 0.0


def _attention_dropout_as_modules(gm: fx.GraphModule) -> None:
    """`aten.scaled_dot_product_attention(..., dropout_p)` captured in training mode keeps its p in
    eval mode too; make p follow the mode, as the model's `dropout if self.training else 0.0`."""
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    for node in gm.graph.find_nodes(op="call_function", target=sdpa):
        p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        if not isinstance(p, float) or p == 0.0:
            continue
        target = f"{node.meta['module_path']}.attention_dropout_p".lstrip(".")
        if not _has_submodule(gm, target):
            gm.add_submodule(target, TrainingOnly(p))
        with gm.graph.inserting_before(node):
            p_node = gm.graph.call_module(target, ())
        p_node.meta.update(
            {k: node.meta[k] for k in ("module_path", "module_type") if k in node.meta}
        )
        if len(node.args) > 4:
            node.update_arg(4, p_node)
        else:
            node.update_kwarg("dropout_p", p_node)


def _has_submodule(gm: nn.Module, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False


def _signature_names(gm: fx.GraphModule, bound: inspect.BoundArguments) -> None:
    """Export lowercases the names of the inputs (`forward(self, X)` becomes `forward(self, x)`);
    give them back the model's own, so that the graph is called with the model's keywords."""
    own = {name.lower(): name for name in bound.arguments}
    renamed = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        name = own.get(str(node.target))
        if name and str(node.target) not in bound.arguments:
            renamed[str(node.target)] = node.target = node.name = name
    codegen = gm.graph._codegen
    if renamed and isinstance(codegen, _PyTreeCodeGen):
        info = codegen.pytree_info
        names = [renamed.get(n, n) for n in info.orig_args]
        codegen.pytree_info = _PyTreeInfo(names, info.in_spec, info.out_spec)


def _drop_constant_inputs(gm: fx.GraphModule) -> None:
    """Export turns constant kwargs (`use_cache=False`) into unused inputs; remove them."""
    codegen = gm.graph._codegen
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not isinstance(codegen, _PyTreeCodeGen) or len(placeholders) != len(
        codegen.pytree_info.orig_args
    ):
        return
    kept = [n for n in placeholders if isinstance(n.meta.get("val"), torch.Tensor) or n.users]
    for node in placeholders:
        if node not in kept:
            gm.graph.erase_node(node)
    names = [str(n.target) for n in kept]
    _, in_spec = pytree.tree_flatten((tuple(range(len(kept))), {}))
    codegen.pytree_info = _PyTreeInfo(names, in_spec, codegen.pytree_info.out_spec)


def _static_dims(gm: fx.GraphModule, dynamic: bool) -> None:
    """Dims 0 and 1 that export fixed although asked to keep them symbolic are guarded in the
    graph, so that another size fails naming the dim instead of deep inside (a scan's length);
    warned where they are a batch or a sequence (size 1; dim 0; dim 1 of token ids or of a
    (batch, sequence, hidden) input), not where they are features or channels."""
    if not dynamic:
        return
    static, surprising = {}, {}
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        dims = range(min(val.dim(), 2))
        fixed = {d: int(val.shape[d]) for d in dims if is_concrete_int(val.shape[d])}
        if fixed:
            static[str(node.target)] = fixed
            _guard_sizes(gm, node, fixed)
        sequence = not val.is_floating_point() or val.dim() == 3
        warn = {d: n for d, n in fixed.items() if n == 1 or d == 0 or sequence}
        if warn:
            surprising[str(node.target)] = warn
    if surprising:
        warnings.warn(
            f"torch.export fixed these input dims (input: {{dim: size}}): {surprising}; the graph "
            "accepts only those sizes there (size 1 is always fixed; otherwise the model's code "
            "specialises the dim). Capture with the sizes you will run, at least 2",
            stacklevel=4,
        )
    peftc_meta(gm)["static_dims"] = static


def _guard_sizes(gm: fx.GraphModule, x: fx.Node, fixed: dict[int, int]) -> None:
    last = next(n for n in reversed(gm.graph.nodes) if n.op == "placeholder")
    with gm.graph.inserting_before(last.next):
        for d, size in fixed.items():
            message = (
                f"input {x.target!r} must have size {size} in dim {d}: torch.export fixed it at "
                "capture; capture again with the size you run"
            )
            actual = gm.graph.call_function(torch.ops.aten.sym_size.int, (x, d))
            same = gm.graph.call_function(operator.eq, (actual, size))
            check = gm.graph.call_function(torch._assert, (same, message))
            for node, val in ((actual, size), (same, True), (check, None)):
                node.meta.update(val=val, module_path="", module_type="")


def _example_inputs(gm: fx.GraphModule, bound: inspect.BoundArguments) -> dict[str, Any]:
    names = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    return {name: bound.arguments[name] for name in names if name in bound.arguments}


# --- symbolic_trace flavour ---------------------------------------------------------------


def _symbolic(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    try:
        traced = fx.symbolic_trace(model)
    except Exception as e:
        raise CaptureError(_failure_message(model, e, "torch.fx.symbolic_trace")) from e
    gm = clone(traced)  # own leaf modules, so rewriting never touches `model`
    types = _module_types(model)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            path = str(node.target)
        elif node.op == "get_attr":
            path = str(node.target).rpartition(".")[0]
        else:
            stack = _real_stack(node)
            path = _normalise_path(stack[-1][0]) if stack else ""
        node.meta["module_path"] = path
        node.meta["module_type"] = types.get(path, "")
    example: dict[str, Any] = {}
    if args or kwargs:
        signature = inspect.signature(model.forward)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as e:
            raise CaptureError(
                f"example inputs do not fit {type(model).__name__}.forward{signature}: {e}"
            ) from e
        bound.apply_defaults()
        example = dict(bound.arguments)
        values = [example[str(n.target)] for n in gm.graph.nodes if n.op == "placeholder"]
        mode = torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True)
        fakes = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in values]
        try:
            FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
        except Exception as e:
            raise CaptureError(
                _failure_message(model, e, "shape propagation of the traced graph")
            ) from e
    peftc_meta(gm)["example_inputs"] = example
    return gm


# --- shared -------------------------------------------------------------------------------


def _real_stack(node: fx.Node) -> list[tuple[str, Any]]:
    """`nn_module_stack` entries, without export's placeholder entry for nodes it made itself."""
    stack = node.meta.get("nn_module_stack") or {}
    return [
        (path, kind)
        for path, kind in stack.values()
        if not str(path).startswith("_empty_nn_module_stack")
    ]


_CONFIG_KEYS = (
    "name_or_path",
    "max_position_embeddings",
    "pad_token_id",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "model_type",
)


def _config_summary(model: nn.Module) -> dict[str, Any]:
    """A few facts of a Hugging Face model's config: the model's own, else that of the one outermost
    submodule with a config (a transformer inside the user's wrapper); empty otherwise."""
    with_config = [path for path, m in model.named_modules() if hasattr(m, "config")]
    outermost = [
        p
        for p in with_config
        if not any(p.startswith(q + ".") or q == "" for q in with_config if q != p)
    ]
    config = model.get_submodule(outermost[0]).config if len(outermost) == 1 else None
    values = {key: getattr(config, key, None) for key in _CONFIG_KEYS}
    return {k: v for k, v in values.items() if isinstance(v, (str, int)) and v != ""}


def _configs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """`config.to_dict()` of each transformers model in `model` (a module whose class declares a
    `config_class`), with the attention implementation it runs."""
    configs = {}
    for path, m in model.named_modules():
        config = getattr(m, "config", None)
        if hasattr(type(m), "config_class") and callable(getattr(config, "to_dict", None)):
            attention = getattr(config, "_attn_implementation", None)
            configs[path] = {**config.to_dict(), "attn_implementation": attention}
    return configs


def _module_types(model: nn.Module) -> dict[str, str]:
    return {path: _qualname(type(m)) for path, m in model.named_modules(remove_duplicate=False)}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _normalise_path(path: str) -> str:
    """`L['self'].model.layers[3]` and `model.layers.3` both become `model.layers.3`."""
    path = path.replace("L['self']", "").replace("L__self__", "")
    for a, b in (("['", "."), ("']", ""), ("[", "."), ("]", ""), ("getattr(", ""), (")", "")):
        path = path.replace(a, b)
    return ".".join(p for p in path.split(".") if p)


def _failure_message(model: nn.Module, error: Exception, tool: str) -> str:
    """Name the innermost module of `model` on the failing stack and the source line there."""
    paths = {id(m): p for p, m in model.named_modules()}
    where, construct = "", ""
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in paths:
            path = paths[id(owner)] or "<root>"
            where = f"{path} ({type(owner).__name__})"
            code = linecache.getline(frame.f_code.co_filename, lineno).strip()
            construct = f"{frame.f_code.co_filename}:{lineno}: {code}"
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    message = (
        f"{tool} could not capture {type(model).__name__}: {type(error).__name__}: {first_line}"
    )
    if where:
        message += f"\n  in module {where}\n  at {construct}"
    fix = (
        "pass example inputs and use method='export' (it handles Python control flow and HF models)"
        if "symbolic" in tool
        else "make that construct traceable (no data-dependent Python control flow on tensor "
        "values, e.g. use torch.where instead of `if tensor:`), or call capture with "
        "method='symbolic' for a plain module"
    )
    return f"{message}\n  fix: {fix}"
