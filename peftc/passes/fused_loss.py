"""`fused_loss`: the LM head and the cross-entropy of a graph captured with labels as one chunked
op, so the full log-probabilities never exist (and, with `logits=false`, the logits neither).

    loss = cross_entropy(view(linear(h, W, b).float(), [-1, V]), labels)
      ->  loss = peftc::linear_cross_entropy(h.reshape(-1, H), W, b, labels, ...)

1. The op computes the logits of `chunk` rows at a time (float32), keeps each row's log-sum-exp
   and adds up `lse - logit[label]` over rows whose label is not `ignore_index`; its backward
   computes each chunk's logits again, `softmax - onehot`, and from them the gradients of h, W and
   b (those that require one). Memory: one chunk of logits instead of the log-probabilities that
   `cross_entropy` saves for backward (tokens x vocabulary floats; 4 GB at 8k tokens and a 128k
   vocabulary).
2. `logits=false` also drops the logits output (the output structure keeps the field, as None),
   so the LM head's full product is not computed at all; trainers that read only the loss lose
   nothing.
3. Only `reduction` mean or sum, no class weights, no label smoothing: other forms are refused by
   name. A graph without an LM head feeding `cross_entropy` is reported unchanged, with why.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import Tensor, fx

from peftc.errors import OptionError
from peftc.ir.graph import tag
from peftc.ir.options import Options, option
from peftc.ir.registry import PassResult, register_pass

__all__ = ["FusedLossOptions", "fused_loss", "linear_cross_entropy"]

aten = torch.ops.aten
_MEAN, _SUM = 1, 2  # aten's reduction codes


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    logits = hidden @ weight.t()
    return (logits if bias is None else logits + bias).float()


@torch.library.custom_op("peftc::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    ignore_index: int,
    reduction: int,
    chunk: int,
) -> tuple[Tensor, Tensor]:
    """(loss, each row's log-sum-exp) of `cross_entropy(hidden @ weight.T + bias, target)`,
    `chunk` rows at a time."""
    lse = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        logits = _chunk_logits(hidden[start : start + chunk], weight, bias)
        rows = target[start : start + chunk]
        lse[start : start + chunk] = torch.logsumexp(logits, dim=-1)
        valid = rows != ignore_index
        picked = logits.gather(1, rows.clamp(min=0).unsqueeze(1)).squeeze(1)
        total += ((lse[start : start + chunk] - picked) * valid).sum()
    if reduction == _MEAN:
        total = total / (target != ignore_index).sum()
    return total, lse


@linear_cross_entropy.register_fake
def _(hidden, weight, bias, target, ignore_index, reduction, chunk):
    return hidden.new_empty((), dtype=torch.float32), hidden.new_empty(
        hidden.shape[0], dtype=torch.float32
    )


@torch.library.custom_op("peftc::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(
    grad: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    lse: Tensor,
    ignore_index: int,
    reduction: int,
    chunk: int,
    weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of hidden, weight and bias; those not wanted (a frozen head, no bias) are empty,
    so a frozen head's (vocabulary x hidden) gradient is never allocated."""
    scale = grad / (target != ignore_index).sum() if reduction == _MEAN else grad
    grad_hidden = torch.empty_like(hidden)
    grad_weight = weight.new_zeros(weight.shape if weight_grad else 0, dtype=torch.float32)
    grad_bias = weight.new_zeros(weight.shape[0] if weight_grad and bias is not None else 0)
    for start in range(0, hidden.shape[0], chunk):
        rows, h = target[start : start + chunk], hidden[start : start + chunk]
        probs = torch.exp(_chunk_logits(h, weight, bias) - lse[start : start + chunk, None])
        valid = rows != ignore_index
        probs[torch.arange(len(rows), device=rows.device), rows.clamp(min=0)] -= 1.0
        probs *= (valid * scale).unsqueeze(1)
        grad_hidden[start : start + chunk] = (probs @ weight.float()).to(hidden.dtype)
        if weight_grad:
            grad_weight += probs.t() @ h.float()
            if bias is not None:
                grad_bias += probs.sum(0)
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias


@linear_cross_entropy_backward.register_fake
def _(grad, hidden, weight, bias, target, lse, ignore_index, reduction, chunk, weight_grad):
    bias_size = weight.shape[0] if weight_grad and bias is not None else 0
    grad_weight = torch.empty_like(weight) if weight_grad else weight.new_empty(0)
    return torch.empty_like(hidden), grad_weight, weight.new_empty(bias_size)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, target, ignore_index, reduction, chunk = inputs
    ctx.save_for_backward(hidden, weight, bias, target, output[1])
    ctx.options = (ignore_index, reduction, chunk)


def _backward(ctx, grad, _grad_lse):
    hidden, weight, bias, target, lse = ctx.saved_tensors
    head = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
    grads = linear_cross_entropy_backward(
        grad, hidden, weight, bias, target, lse, *ctx.options, head
    )
    grad_hidden, grad_weight, grad_bias = grads
    return (
        grad_hidden if ctx.needs_input_grad[0] else None,
        grad_weight if ctx.needs_input_grad[1] else None,
        grad_bias if bias is not None and ctx.needs_input_grad[2] else None,
        None,
        None,
        None,
        None,
    )


linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


@dataclass(frozen=True)
class FusedLossOptions(Options):
    chunk: int = option(1024, doc="rows (tokens) whose logits exist at once")
    logits: bool = option(True, doc="keep the logits output (false: None, never computed)")


@register_pass("fused_loss", options=FusedLossOptions)
def fused_loss(gm: fx.GraphModule, options: FusedLossOptions) -> PassResult:
    """`cross_entropy(linear(h, W, b), labels)` -> one chunked op; the full log-probabilities (and
    with `logits=false` the logits) never exist."""
    if options.chunk < 1:
        raise OptionError(f"fused_loss: chunk must be at least 1, got {options.chunk}")
    found = [(n, _head(n)) for n in gm.graph.find_nodes(op="call_function", target=_CE)]
    found = [(n, head) for n, head in found if head is not None]
    if not found:
        return PassResult(
            gm,
            modified=False,
            report="no cross_entropy of an LM head's logits: capture the model with labels",
        )
    for node, head in found:
        _fuse(gm, node, head, options)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    paths = tuple(head.meta.get("module_path", "") for _, head in found)
    kept = "kept" if options.logits else "dropped (None)"
    return PassResult(gm, modified=True, sites=paths, report=f"fused; logits {kept}")


_CE = aten.cross_entropy_loss.default
_PASS_THROUGH = (aten.to.dtype, aten._to_copy.default, aten.view.default, aten.reshape.default)


def _head(ce: fx.Node) -> fx.Node | None:
    """The `linear` whose logits `ce` reads (through casts and reshapes), if any."""
    value = ce.args[0]
    while isinstance(value, fx.Node) and value.target in _PASS_THROUGH:
        value = value.args[0]
    return value if isinstance(value, fx.Node) and value.target is aten.linear.default else None


def _fuse(gm: fx.GraphModule, ce: fx.Node, head: fx.Node, options: FusedLossOptions) -> None:
    args = list(ce.args) + [None] * (6 - len(ce.args))
    _, target, weight, reduction, ignore_index, smoothing = args
    reduction = ce.kwargs.get("reduction", _MEAN if reduction is None else reduction)
    ignore_index = ce.kwargs.get("ignore_index", -100 if ignore_index is None else ignore_index)
    smoothing = ce.kwargs.get("label_smoothing", smoothing or 0.0)
    if ce.kwargs.get("weight", weight) is not None or smoothing or reduction not in (_MEAN, _SUM):
        raise OptionError(
            "fused_loss: the cross_entropy uses class weights, label smoothing or reduction='none'"
            ", which the fused op does not compute; leave this graph unfused"
        )
    hidden, lm_weight, bias = (list(head.args) + [None])[:3]
    graph = gm.graph
    with graph.inserting_before(ce):
        width = hidden.meta["val"].shape[-1]
        flat = graph.call_function(aten.reshape.default, (hidden, [-1, width]))
        fused = graph.call_function(
            torch.ops.peftc.linear_cross_entropy.default,
            (flat, lm_weight, bias, target, ignore_index, reduction, options.chunk),
        )
        loss = graph.call_function(operator.getitem, (fused, 0))
    for node, role in ((flat, "hidden"), (fused, "fused"), (loss, "loss")):
        tag(node, pass_name="fused_loss", role=role, path=head.meta.get("module_path", ""))
    ce.replace_all_uses_with(loss)
    graph.erase_node(ce)
    if not options.logits:
        _drop_logits(graph, head)


def _drop_logits(graph: fx.Graph, head: fx.Node) -> None:
    """The output's logits (the head's product, through casts) become None."""
    (output,) = graph.find_nodes(op="output")
    chain, value = {head}, head
    while True:
        users = [u for u in value.users if u.target in _PASS_THROUGH]
        if not users:
            break
        value = users[0]
        chain.add(value)
    leaves = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    output.args = (tuple(None if leaf in chain else leaf for leaf in leaves),)
    for node in chain:  # metadata checks would keep the product alive
        for check in [u for u in node.users if u.target is aten._assert_tensor_metadata.default]:
            graph.erase_node(check)
