"""`fused_loss`: the LM head and the cross-entropy of a graph captured with labels as one chunked
op, so the full log-probabilities never exist (and, with `logits=false`, the logits neither).

    loss = cross_entropy(view(linear(h, W, b).float(), [-1, V]), labels)
      ->  loss = peftc::linear_cross_entropy(h.reshape(-1, H), W, b, labels, ...)

1. The op computes the logits of `chunk` rows at a time (float32) and adds up
   `logsumexp - logit[label]` over rows whose label is not `ignore_index`; while a chunk's logits
   exist it also turns them into `softmax - onehot` and from that into the gradients of h, W and
   b that autograd will ask for (grad mode on, and each requiring one), as Liger's fused linear
   cross-entropy does; backward only scales them. Memory: one chunk of logits instead of the
   log-probabilities that `cross_entropy` saves for backward (tokens x vocabulary floats; 4 GB at
   8k tokens and a 128k vocabulary).
2. `logits=false` also drops the logits output (the output structure keeps the field, as None),
   so the LM head's full product is not computed at all; trainers that read only the loss lose
   nothing.
3. Only `reduction` mean or sum, no class weights, no label smoothing: other forms are refused by
   name. A graph without an LM head feeding `cross_entropy` is reported unchanged, with why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, fx

from peftc.errors import OptionError
from peftc.ir.graph import tag
from peftc.ir.options import Options, option
from peftc.ir.registry import PassResult, register_pass

__all__ = ["FusedLossOptions", "fused_loss", "linear_cross_entropy", "fused_linear_cross_entropy"]

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
    hidden_grad: bool,
    head_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The loss of `cross_entropy(hidden @ weight.T + bias, target)`, `chunk` rows at a time, and
    while each chunk's logits exist, the loss's gradients: of hidden (if `hidden_grad`), of weight
    and bias (if `head_grad`); those not computed are empty."""
    rows_total = hidden.shape[0]
    total = hidden.new_zeros((), dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if hidden_grad else hidden.new_empty(0)
    grad_weight = weight.new_zeros(weight.shape if head_grad else 0, dtype=torch.float32)
    grad_bias = weight.new_zeros(weight.shape[0] if head_grad and bias is not None else 0)
    for start in range(0, rows_total, chunk):
        h, rows = hidden[start : start + chunk], target[start : start + chunk]
        logits = _chunk_logits(h, weight, bias)
        lse = torch.logsumexp(logits, dim=-1)
        valid = rows != ignore_index
        picked = logits.gather(1, rows.clamp(min=0).unsqueeze(1)).squeeze(1)
        total += ((lse - picked) * valid).sum()
        if not (hidden_grad or head_grad):
            continue
        probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in the logits' memory
        probs[torch.arange(len(rows), device=rows.device), rows.clamp(min=0)] -= 1.0
        probs *= valid.unsqueeze(1)
        if hidden_grad:
            grad_hidden[start : start + chunk] = (probs @ weight.float()).to(hidden.dtype)
        if head_grad:
            grad_weight += probs.t() @ h.float()
            if bias is not None:
                grad_bias += probs.sum(0)
    if reduction == _MEAN:
        count = (target != ignore_index).sum()
        total, grad_hidden, grad_weight, grad_bias = (
            t / count for t in (total, grad_hidden, grad_weight, grad_bias)
        )
    return total, grad_hidden, grad_weight.to(weight.dtype), grad_bias


@linear_cross_entropy.register_fake
def _(hidden, weight, bias, target, ignore_index, reduction, chunk, hidden_grad, head_grad):
    grad_hidden = torch.empty_like(hidden) if hidden_grad else hidden.new_empty(0)
    grad_weight = torch.empty_like(weight) if head_grad else weight.new_empty(0)
    bias_size = weight.shape[0] if head_grad and bias is not None else 0
    loss = hidden.new_empty((), dtype=torch.float32)
    return loss, grad_hidden, grad_weight, weight.new_empty(bias_size, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.has_bias = inputs[2] is not None


def _backward(ctx, grad, *_):
    grads = (g * grad if g.numel() else None for g in ctx.saved_tensors)
    grad_hidden, grad_weight, grad_bias = grads
    needs = ctx.needs_input_grad
    return (
        grad_hidden if needs[0] else None,
        grad_weight if needs[1] else None,
        grad_bias if ctx.has_bias and needs[2] else None,
        *[None] * 6,
    )


linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    ignore_index: int,
    reduction: int,
    chunk: int,
) -> Tensor:
    """The loss; the gradients are computed with it where autograd will ask for them."""
    grad = torch.is_grad_enabled()
    head = grad and (weight.requires_grad or (bias is not None and bias.requires_grad))
    flags = (grad and hidden.requires_grad, head)
    args = (hidden, weight, bias, target, ignore_index, reduction, chunk, *flags)
    return torch.ops.peftc.linear_cross_entropy.default(*args)[0]


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
        loss = graph.call_function(
            fused_linear_cross_entropy,
            (flat, lm_weight, bias, target, ignore_index, reduction, options.chunk),
        )
    for node, role in ((flat, "hidden"), (loss, "loss")):
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
