"""Serving many LoRA adapters over one base in one batch: each row picks its adapter by id.

    y = base(x) + B_stack[id] @ (A_stack[id] @ x)   for each row of the batch; nothing where id = -1

1. Every LoRA adapter in the graph's record, in record order, is stacked at each site it adapts:
   `A_stack` (N, r_max, in) and `B_stack` (N, r_max, out), B transposed and scaled by the adapter's
   scaling. Ranks differ freely: a rank-r adapter fills the first r rows of both, the rest are
   zeros, so its product is exact. An adapter that does not adapt a site has zeros there.
2. The graph takes a new input, `adapter_ids` (one integer per row, -1 = the base alone), and each
   adapted site adds `peftc::multi_lora_delta(x, ids, A_stack, B_stack)`; the adapters' own branches
   are switched off (they stay in the record: `peftc.save_adapter` still writes each).
3. Adding or removing an adapter while serving: load it (`peftc.load_adapter(gm, folder,
   adapter=...)`) or delete it (`delete_adapter(name=...)`) and apply `multi_lora` again; it
   restacks from the record, without capture. `peftc.adapter_ids(gm, names)` turns adapter names
   (None = base) into ids.
4. `kernel="torch"`: while N * r_max fits in the site's input width, two dense products over all
   adapters' ranks (each token's other adapters masked to zero); beyond, tokens grouped by adapter,
   two matmuls per adapter present. `kernel="triton"`: the Triton shrink/expand kernel over tokens
   sorted by adapter.
5. LoRA on parameters (`target_parameters`: routers, mixture-of-experts weight stacks) is served
   too: `peftc.passes.multi_lora_parameters`.
6. Every other technique that folds into a linear site's weight (DoRA, LoHa, LoKr, IA3, VeRA, OFT,
   ...: what `merge` can fold) is served from its folded update, stacked dense: `D_stack` (N, out,
   in) = W' - W and the bias's, and `peftc::multi_dense_delta(x, ids, D_stack, b_stack)` adds row
   i's own. Exact for any such technique, at the memory of one weight per adapter and site (LoRA's
   stacks stay low-rank). Techniques that do not fold (prompt and prefix tuning, adapter blocks,
   side networks), merged adapters, and those on other sites are refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, fx

from peftc.errors import OptionError, PassError
from peftc.ir.graph import add_input, get_tensor, peftc_meta, set_tensor, tag
from peftc.ir.options import Options, option
from peftc.ir.registry import PassResult, register_pass
from peftc.passes.multi_lora_parameters import serve_parameter
from peftc.sites import LinearSite, weight_sites
from peftc.sites.parameters import parameter_sites
from peftc.technique.adapters import adapters, set_active

__all__ = [
    "MultiLoraOptions",
    "multi_lora",
    "multi_lora_delta",
    "adapter_ids",
    "register_kernel",
    "token_ids",
    "expert_row_ids",
]

MODULE = "multi_lora"
IDS = "adapter_ids"


@torch.library.custom_op("peftc::multi_lora_delta", mutates_args=())
def multi_lora_delta(x: Tensor, ids: Tensor, lora_A: Tensor, lora_B: Tensor) -> Tensor:
    """Row i of the batch gets x_i A[ids[i]]^T B[ids[i]] (A: N x r x in, B: N x r x out, scaled); 0
    where ids[i] = -1."""
    x2 = x.reshape(-1, x.shape[-1])
    tokens = token_ids(ids, x2.shape[0])
    adapters, rank, in_features = lora_A.shape
    if adapters * rank <= in_features:
        # every adapter's shrink at once, each token keeping its own: two dense products, no groups
        shrunk = (x2 @ lora_A.reshape(adapters * rank, in_features).t()).view(-1, adapters, rank)
        shrunk = shrunk * (tokens[:, None] == torch.arange(adapters, device=x.device))[:, :, None]
        expand = lora_B.reshape(adapters * rank, -1)  # a view: B is stacked rank-major for this
        return (shrunk.reshape(-1, adapters * rank) @ expand).view(*x.shape[:-1], lora_B.shape[2])
    out = x2.new_zeros(x2.shape[0], lora_B.shape[2])
    for adapter in tokens.unique().tolist():
        if adapter >= 0:
            rows = (tokens == adapter).nonzero().squeeze(1)
            out[rows] = (x2[rows] @ lora_A[adapter].t()) @ lora_B[adapter]
    return out.view(*x.shape[:-1], lora_B.shape[2])


@multi_lora_delta.register_fake
def _(x, ids, lora_A, lora_B):
    return x.new_empty(*x.shape[:-1], lora_B.shape[2])


def token_ids(ids: Tensor, tokens: int) -> Tensor:
    """One id per token: the rows' ids, each repeated over its row's tokens (x may be flattened)."""
    if tokens % ids.numel():
        raise OptionError(
            f"adapter_ids has {ids.numel()} entries, but the batch has {tokens} tokens: give one "
            "id per row of the batch"
        )
    return ids.reshape(-1).repeat_interleave(tokens // ids.numel())


@torch.library.custom_op("peftc::multi_dense_delta", mutates_args=())
def multi_dense_delta(x: Tensor, ids: Tensor, delta: Tensor, bias: Tensor) -> Tensor:
    """Row i of the batch gets x_i D[ids[i]]^T + b[ids[i]] (D: N x out x in, b: N x out); 0 where
    ids[i] = -1. Tokens are grouped by adapter: one matmul per adapter present."""
    x2 = x.reshape(-1, x.shape[-1])
    tokens = token_ids(ids, x2.shape[0])
    out = x2.new_zeros(x2.shape[0], delta.shape[1])
    for adapter in tokens.unique().tolist():
        if adapter >= 0:
            rows = (tokens == adapter).nonzero().squeeze(1)
            out[rows] = torch.addmm(bias[adapter], x2[rows], delta[adapter].t())
    return out.view(*x.shape[:-1], delta.shape[1])


@multi_dense_delta.register_fake
def _(x, ids, delta, bias):
    return x.new_empty(*x.shape[:-1], delta.shape[1])


@torch.library.custom_op("peftc::checked_adapter_ids", mutates_args=())
def checked_adapter_ids(ids: Tensor, batch_of: Tensor, adapters: int) -> Tensor:
    """`ids`, refused unless one per row of `batch_of` (the graph's first input), each from -1
    (the base) to `adapters` - 1: a short list would otherwise broadcast over the rows, and an id
    out of range would silently pick no adapter."""
    if ids.dim() != 1 or ids.numel() != batch_of.shape[0]:
        raise OptionError(
            f"adapter_ids has shape {tuple(ids.shape)} for a batch of {batch_of.shape[0]} rows: "
            "give one id per row (-1 for the base), e.g. peftc.adapter_ids(gm, names)"
        )
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= adapters):
        bad = ids[(ids < -1) | (ids >= adapters)][0]
        raise OptionError(
            f"adapter id {int(bad)} is out of range: {adapters} adapters are stacked (ids 0.."
            f"{adapters - 1}, -1 for the base)"
        )
    return ids.clone()


@checked_adapter_ids.register_fake
def _(ids, batch_of, adapters):
    return torch.empty_like(ids)


@torch.library.custom_op("peftc::expert_row_ids", mutates_args=())
def expert_row_ids(ids: Tensor, tokens: Tensor, token_index: Tensor, offs: Tensor) -> Tensor:
    """For each row of an experts' sorted input: `adapter * E + expert`, or -1 for the base.

    ids: one adapter id per batch row; tokens: the (tokens, hidden) input the sorted rows were
    gathered from; token_index: the token each sorted row is; offs: rows per expert, cumulative."""
    adapter = token_ids(ids, tokens.shape[0])[token_index]
    rows = torch.arange(token_index.shape[0], device=offs.device)
    expert = torch.searchsorted(offs.to(torch.long), rows, right=True)
    return torch.where(adapter >= 0, adapter * offs.shape[0] + expert, -1)


@expert_row_ids.register_fake
def _(ids, tokens, token_index, offs):
    return token_index.new_empty(token_index.shape, dtype=torch.long)


_DENSE = torch.ops.peftc.multi_dense_delta.default

# kernel name -> (gm -> the op computing multi_lora_delta); a backend registers its own
# (peftc.backends.triton)
_KERNELS: dict[str, Callable[[fx.GraphModule], Any]] = {
    "torch": lambda gm: torch.ops.peftc.multi_lora_delta.default
}


def register_kernel(name: str, resolve: Callable[[fx.GraphModule], Any]) -> None:
    """Make `multi_lora(kernel=name)` call the op `resolve(gm)` returns (it raises `PassError` where
    it cannot run)."""
    _KERNELS[name] = resolve


def _kernel(gm: fx.GraphModule, name: str) -> Any:
    if name not in _KERNELS:
        raise PassError(
            f"multi_lora: kernel {name!r} is provided by a backend that is not loaded; loaded: "
            f"{', '.join(_KERNELS)}"
        )
    return _KERNELS[name](gm)


@dataclass(frozen=True)
class MultiLoraOptions(Options):
    kernel: Literal["torch", "triton"] = option(
        "torch", doc="what computes the stacked delta: torch ops, or the Triton kernel (GPU)"
    )


@register_pass("multi_lora", options=MultiLoraOptions)
def multi_lora(gm: fx.GraphModule, options: MultiLoraOptions) -> PassResult:
    """Stack every LoRA adapter of the record per site; the graph takes `adapter_ids` (one per row,
    -1 = base).

    Re-apply after loading or deleting adapters: it restacks from the record. See docs/serving.md.
    """
    records = list(adapters(gm).values())
    _check_servable(records)
    target = _kernel(gm, options.kernel)
    _unstack(gm)
    set_active(gm, [])  # the branches go; the stacks replace them
    names = [r.name for r in records]
    refs = list(dict.fromkeys(ref for r in records for ref in r.sites))
    by_path = {s.path: s for s in weight_sites(gm)}
    parameters = {s.path: s for s in parameter_sites(gm)}
    _check_sites(records, refs, by_path, parameters)
    ids = _checked(gm, _ids_input(gm), len(names))
    for path, kind in refs:
        if kind == "parameter":
            site = parameters[path]
            stacks = _stack(gm, (path, kind), records, *site.experts_in_out)
            for matmul, x, rows in serve_parameter(gm, site, ids):
                _add_delta(gm, path, matmul, x, ids if rows is None else rows, stacks, target)
        else:
            _serve_linear(gm, by_path[path], kind, records, ids, target)
    paths = [path for path, _ in refs]
    peftc_meta(gm)[MODULE] = {"adapters": names, "sites": paths, "kernel": options.kernel}
    gm.graph.lint()
    gm.recompile()
    ranks = sorted({r.options_at(p).r for r in records if _low_rank(r) for p, _ in r.sites})
    dense = [r.name for r in records if not _low_rank(r)]
    return PassResult(
        gm,
        modified=True,
        sites=tuple(paths),
        report=f"{len(names)} adapters ({', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
        + (f"; LoRA ranks {', '.join(map(str, ranks))}" if ranks else "")
        + (f"; {', '.join(dense)} as dense weight updates" if dense else "")
        + f") stacked at {len(paths)} sites; input '{IDS}' picks one per row",
    )


def _check_sites(records: list, refs: list, by_path: dict, parameters: dict) -> None:
    wrong = [
        path
        for path, kind in refs
        if not (kind == "parameter" and path in parameters)
        and not isinstance(by_path.get(path), LinearSite)
    ]
    wrong += [
        f"{r.name} ({r.technique}) at {path}"
        for r in records
        if not _low_rank(r)
        for path, kind in r.sites
        if kind == "parameter"
    ]
    if wrong:
        raise PassError(
            "multi_lora serves adapters on linear sites, and LoRA on parameters read by a linear "
            f"or an experts' grouped matmul; {', '.join(wrong[:4])} are neither"
        )


def _serve_linear(
    gm: fx.GraphModule, site: LinearSite, kind: str, records: list, ids: fx.Node, kernel: Any
) -> None:
    """LoRA's low-rank stacks at a linear site, and the dense updates of the other techniques
    (and of module copies) there."""
    ref = (site.path, kind)
    here = [r for r in records if ref in r.sites]
    if kind != "module" and any(_low_rank(r) for r in here):
        stacks = _stack(gm, ref, records, 1, site.in_features, site.out_features)
        _add_delta(gm, site.path, site.node, site.input, ids, stacks, kernel)
    if kind == "module" or not all(_low_rank(r) for r in here):
        dense = _dense_stack(gm, site, ref, records)
        _add_delta(gm, site.path, site.node, site.input, ids, dense, _DENSE, "dense")


def _low_rank(record) -> bool:
    return record.technique == "lora" and not record.options.dora


def _check_servable(records: list) -> None:
    merged = [r.name for r in records if r.merged]
    if merged:
        raise PassError(
            f"multi_lora serves unmerged adapters; {', '.join(merged)} are merged: unmerge or "
            "delete them first"
        )
    unfoldable = [
        f"{r.name} ({r.technique})" for r in records if not _low_rank(r) and not _folds(r.method())
    ]
    if unfoldable:
        raise PassError(
            f"multi_lora batches adapters per row by their weight update; {', '.join(unfoldable)} "
            "change the model in other ways (tokens, blocks, side networks) and cannot be "
            "batched per row: delete them from the serving graph"
        )
    if not records:
        raise PassError(
            "multi_lora: this graph has no adapter; add or load some first "
            "(peftc.load_adapter(gm, folder, adapter='name'))"
        )


def _folds(method) -> bool:
    """Whether the technique folds into its site's weight (overrides `fold` or `delta`)."""
    from peftc.technique.declaration import Technique

    kind = type(method)
    return kind.fold is not Technique.fold or kind.delta is not Technique.delta


def _dense_stack(
    gm: fx.GraphModule, site: LinearSite, ref: tuple[str, str], records: list
) -> tuple[Tensor, Tensor]:
    """(N, out, in) weight updates and (N, out) bias updates: each folding adapter's W' - W at
    the site (an adapter's copy of the module minus the module, for modules_to_save), zeros for
    the others (LoRA's are in the low-rank stacks)."""
    from peftc.sites.formats import format_of
    from peftc.technique.adapters import context

    with torch.no_grad():
        weight = format_of(site).read(gm, site).float()
        bias = get_tensor(gm, site.bias).float() if site.bias else weight.new_zeros(len(weight))
        deltas = weight.new_zeros(len(records), *weight.shape)
        biases = weight.new_zeros(len(records), weight.shape[0])
        for i, record in enumerate(records):
            if ref not in record.sites or (_low_rank(record) and ref[1] != "module"):
                continue
            ctx = context(gm, record, site)
            if ref[1] == "module":  # the adapter's own copy of the module (modules_to_save)
                (attr,) = record.modules[site.path]
                folded = ctx.tensor(f"{attr}.weight").float()
                new_bias = ctx.tensor(f"{attr}.bias").float() if site.bias else None
            else:
                folded, new_bias = record.method().fold(ctx, weight, bias)
            deltas[i] = folded - weight
            biases[i] = (bias if new_bias is None else new_bias) - bias
    dtype = get_tensor(gm, site.bias).dtype if site.bias else deltas.dtype
    return deltas.to(dtype), biases.to(dtype)


def _add_delta(
    gm: fx.GraphModule,
    path: str,
    out: fx.Node,
    x: fx.Node,
    ids: fx.Node,
    stacks: tuple[Tensor, Tensor],
    kernel: Any,
    kind: str = "lora",
) -> None:
    """`out` -> `out + kernel(x, ids, *stacks)`: every adapter's low-rank A and B, or (`dense`)
    every adapter's weight and bias updates."""
    graph = gm.graph
    prefix = f"{MODULE}.{path.replace('.', '_')}"
    names = ("lora_A", "lora_B") if kind == "lora" else ("dense_weight", "dense_bias")
    for name, stack in zip(names, stacks, strict=True):
        set_tensor(gm, f"{prefix}.{name}", stack, buffer=True)

    def tagged(node: fx.Node, role: str) -> fx.Node:
        return tag(node, pass_name="multi_lora", role=role, path=path)

    with graph.inserting_before(out.next):
        a, b = (tagged(graph.get_attr(f"{prefix}.{name}"), name) for name in names)
        delta = tagged(graph.call_function(kernel, (x, ids, a, b)), "delta")
        added = tagged(graph.call_function(torch.ops.aten.add.Tensor, (out, delta)), "output")
    out.replace_all_uses_with(added, delete_user_cb=lambda user: user is not added)


def _stack(
    gm: fx.GraphModule, ref: tuple[str, str], records: list, experts: int, fan_in: int, fan_out: int
) -> tuple[Tensor, Tensor]:
    """A (N * E, r_max, in) and scaled B^T (N * E, r_max, out): pair `adapter * E + expert` (E = 1
    at a linear site). An adapter's A is (r * E, in) with expert e's rows at `A.view(E, r, in)[e]`
    and B (out, r * E) with its columns at `B.view(out, r, E)[..., e]`, as peft lays them out."""
    path = ref[0]
    here = [(i, r) for i, r in enumerate(records) if ref in r.sites and _low_rank(r)]
    rank = max(r.options_at(path).r for _, r in here)
    first = get_tensor(gm, here[0][1].names[path]["lora_A"])
    A = first.new_zeros(len(records) * experts, rank, fan_in)
    B = first.new_zeros(len(records) * experts, rank, fan_out)
    with torch.no_grad():
        for i, record in here:
            names, options = record.names[path], record.options_at(path)
            r, rows = options.r, slice(i * experts, (i + 1) * experts)
            A[rows, :r] = get_tensor(gm, names["lora_A"]).view(experts, r, fan_in)
            b = get_tensor(gm, names["lora_B"]).view(fan_out, r, experts).permute(2, 1, 0)
            B[rows, :r] = b * options.scaling
    return A, B


def _ids_input(gm: fx.GraphModule) -> fx.Node:
    """The graph's `adapter_ids` input, added after its other inputs the first time."""
    found = next((n for n in gm.graph.find_nodes(op="placeholder") if n.target == IDS), None)
    return (
        found if found is not None else add_input(gm.graph, IDS, pass_name="multi_lora", role="ids")
    )


def _checked(gm: fx.GraphModule, ids: fx.Node, adapters: int) -> fx.Node:
    """`peftc::checked_adapter_ids` of the input, right after the graph's inputs."""
    inputs = list(gm.graph.find_nodes(op="placeholder"))
    with gm.graph.inserting_after(inputs[-1]):
        node = gm.graph.call_function(
            torch.ops.peftc.checked_adapter_ids.default, (ids, inputs[0], adapters)
        )
    return tag(node, pass_name="multi_lora", role="checked_ids", path="")


def _unstack(gm: fx.GraphModule) -> None:
    """Remove an earlier stacking (its nodes and buffers), keeping the `adapter_ids` input."""
    if MODULE not in peftc_meta(gm):
        return
    nodes = [
        n
        for n in gm.graph.nodes
        if n.meta.get("peftc", {}).get("pass") == "multi_lora" and n.op != "placeholder"
    ]
    for node in nodes:
        if node.meta["peftc"]["role"] == "output":
            node.replace_all_uses_with(node.args[0])
    for node in reversed(nodes):
        gm.graph.erase_node(node)
    delattr(gm, MODULE)
    del peftc_meta(gm)[MODULE]


def adapter_ids(gm: fx.GraphModule, names: list[str | None]) -> Tensor:
    """The `adapter_ids` input for rows using adapters `names` (None: the base model alone)."""
    stacked = peftc_meta(gm).get(MODULE, {}).get("adapters")
    if stacked is None:
        raise PassError("this graph serves no stacked adapters; apply 'multi_lora' first")
    unknown = sorted({n for n in names if n is not None and n not in stacked})
    if unknown:
        raise OptionError(
            f"no adapter named {', '.join(map(repr, unknown))} is stacked; stacked: "
            f"{', '.join(stacked)}"
        )
    device = next((b.device for b in gm.buffers()), torch.device("cpu"))
    return torch.tensor(
        [-1 if n is None else stacked.index(n) for n in names], dtype=torch.long, device=device
    )
