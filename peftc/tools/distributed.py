"""FSDP2 over a peftc graph: 4-bit weights sharded like any frozen parameter, one block gathered at
a time.

    gm = peftc.apply(captured, "nf4, freeze, lora(r=8), outline")
    peftc.distributed.shard(gm, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))

1. Storage: the tensors that hold each site's weight (`WeightFormat.storage`: NF4's packed bytes,
   block absmax codes, their scale and offset) become frozen parameters, so `fully_shard` shards
   them on dim 0 and all-gathers the bytes as they are: no full-precision copy of a quantized weight
   is ever made outside the op that reads it. FSDP2 casts only floating parameters under a
   `MixedPrecisionPolicy`: packed bytes and absmax codes stay integers; the float scale and offset
   of the absmax codes are cast with the rest (the weight is then decoded in the compute dtype, as
   bf16 compute does anyway).
2. Blocks: `outline` made each block a submodule the graph calls, so `fully_shard` on each block
   gathers its weights just before the block runs and frees them after (again for backward); the
   root keeps what lies outside blocks (embeddings, final norm, head) gathered for the step.
3. Mixed precision (`MixedPrecisionPolicy(param_dtype=torch.bfloat16)`): capture the model in bf16
   (a captured graph keeps the dtypes it was captured with); `shard` keeps the trainable weights in
   float32 (master weights, float32 optimizer states) and FSDP2 casts them to bf16 for compute.
4. After training, `gather_trainable` (called on every rank) returns the full trainable tensors:
   load them into an unsharded graph to save the adapter or merge it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from peftc.errors import PassError
from peftc.ir.graph import get_tensor, qualify, set_tensor
from peftc.sites.formats import format_of_node

__all__ = [
    "shard",
    "storage_names",
    "storage_bytes",
    "storage_as_parameters",
    "gather_trainable",
    "load_trainable",
]


def storage_names(gm: fx.GraphModule) -> list[str]:
    """Names of the tensors that hold quantized weights (`WeightFormat.storage` of every site whose
    op computes through a registered format), in the graph and in its outlined blocks."""
    from peftc.passes.outline import blocks

    names = []
    for prefix in [""] + blocks(gm):
        module = gm.get_submodule(prefix) if prefix else gm
        for node in module.graph.nodes:
            fmt = format_of_node(node)
            if fmt is not None:
                names += [
                    qualify(prefix, name) for name in fmt.storage(module, fmt.site(module, node))
                ]
    return list(dict.fromkeys(names))


def storage_bytes(gm: fx.GraphModule) -> int:
    """Bytes of quantized storage this process holds (its shards, once sharded)."""
    tensors = [get_tensor(gm, name) for name in storage_names(gm)]
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def storage_as_parameters(gm: fx.GraphModule) -> list[str]:
    """Register the quantized storage tensors as frozen parameters (what `fully_shard` shards);
    returns the names converted. A 0-dim tensor (NF4's absmax offset) becomes 1-dim: `fully_shard`
    refuses scalar parameters, and the one element broadcasts the same."""
    converted = []
    for name in storage_names(gm):
        tensor = get_tensor(gm, name)
        if not isinstance(tensor, nn.Parameter):
            set_tensor(
                gm,
                name,
                nn.Parameter(
                    tensor.reshape(1) if tensor.dim() == 0 else tensor, requires_grad=False
                ),
            )
            converted.append(name)
    return converted


def shard(
    gm: fx.GraphModule,
    *,
    mesh: Any = None,
    mp_policy: Any = None,
    reshard_after_forward: bool = True,
    **fully_shard_options: Any,
) -> fx.GraphModule:
    """Apply FSDP2's `fully_shard` to each outlined block, then to the root; storage first becomes
    frozen parameters. Call it on every rank after `init_process_group`, with the same graph on
    each."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from peftc.passes.outline import blocks

    paths = blocks(gm)
    if not paths:
        raise PassError(
            "shard: this graph has no outlined blocks, so FSDP2 could only gather the whole model "
            "at once; end the pipeline with 'outline' (e.g. \"nf4, freeze, lora(r=8), outline\")"
        )
    param_dtype = getattr(mp_policy, "param_dtype", None)
    if param_dtype is not None:
        _keep_master_weights(gm, param_dtype)
    storage_as_parameters(gm)
    options = dict(fully_shard_options, mp_policy=mp_policy or MixedPrecisionPolicy())
    if mesh is not None:
        options["mesh"] = mesh
    for path in paths:
        fully_shard(gm.get_submodule(path), reshard_after_forward=reshard_after_forward, **options)
    fully_shard(gm, **options)
    return gm


def _keep_master_weights(gm: fx.GraphModule, param_dtype: torch.dtype) -> None:
    """Mixed precision on a captured graph: the graph fixes its dtypes (casts, dtype checks) at
    capture, so it must have been captured in the compute dtype; trainable parameters are then kept
    in float32, and FSDP2 casts them to `param_dtype` for each forward."""
    frozen = {p.dtype for p in gm.parameters() if p.is_floating_point() and not p.requires_grad}
    if frozen and frozen != {param_dtype}:
        raise PassError(
            f"shard: mp_policy computes in {param_dtype}, but this graph was captured in "
            f"{', '.join(sorted(map(str, frozen)))} and checks its dtypes; capture the model in "
            f"{param_dtype} (model.to({param_dtype}) before peftc.capture): its trainable weights "
            "are kept in float32 here"
        )
    for name, p in list(gm.named_parameters()):
        if p.requires_grad and p.dtype != torch.float32:
            set_tensor(gm, name, nn.Parameter(p.detach().float()))


def gather_trainable(gm: nn.Module, *, gradients: bool = False) -> dict[str, torch.Tensor]:
    """Full copies of the trainable parameters (or of their gradients), by name; a collective: call
    it on every rank."""
    state = {}
    for name, p in gm.named_parameters():
        if p.requires_grad and (p.grad is not None or not gradients):
            tensor = p.grad if gradients else p
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            state[name] = full.detach().clone()
    return state


def load_trainable(gm: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `gather_trainable`'s tensors into another graph of the same pipeline (unsharded, e.g.
    without `outline`, to save the adapter or merge): the names, shapes and trainable parameters
    must match."""
    params = {name: p for name, p in gm.named_parameters() if p.requires_grad}
    unexpected = sorted(set(state) - set(params))
    missing = sorted(set(params) - set(state))
    misshapen = sorted(
        n for n in set(state) & set(params) if tuple(state[n].shape) != tuple(params[n].shape)
    )
    if unexpected or missing or misshapen:
        problems = [
            f"{len(names)} {what} (e.g. {names[0]!r})"
            for what, names in (
                ("not trainable here", unexpected),
                ("trainable here but not given", missing),
                ("of another shape", misshapen),
            )
            if names
        ]
        raise PassError(
            f"load_trainable: {'; '.join(problems)}; build the graph with the same pipeline "
            "(outline does not change names)"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
