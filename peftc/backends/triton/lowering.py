"""Lowering to Triton: each LoRA linear site (dense or NF4 base) and each bare NF4 linear becomes
one fused op.

    linear(x, W, b) + s * lora_B(lora_A(dropout(x))) -> TritonLinear(x, W, b, lora_A, lora_B)
    nf4_linear(x, W_nf4, ..., b) + s * ...           -> TritonLinear(x, W_nf4, ..., lora_A, lora_B)
    nf4_linear(x, W_nf4, ..., b)                     -> TritonLinear(x, W_nf4, ..., b)

`TritonLinear` (a submodule per site under `triton_linears`) calls `peftc::triton_linear`
(`peftc.backends.triton.ops`): the NF4 weight is decoded tile by tile in registers, the LoRA product
is added in the same kernel, and only x and the rank-r product are saved for backward. Dropout
follows the graph's train/eval mode.

1. Matched through the technique layer: a site is lowered when its only active, unmerged adapter is
   a LoRA adapter on a linear (not DoRA, not nn.MultiheadAttention's merged-weight form); sites with
   other techniques, or several adapters, stay as they are and are counted in the report.
2. Dense linears without an adapter stay: cuBLAS is already the kernel for them.
3. Lowering is the last rewrite: afterwards adapters cannot be added, switched or merged (the
   technique layer refuses, naming 'triton'); save adapters and merge on the graph before lowering.
4. `compile=true` also compiles the graph module's forward with `torch.compile` (in place).
5. Triton needs a CUDA device, or `TRITON_INTERPRET=1` set before Python starts (the CPU
   interpreter: slow, for tests). Without either, the pass stops saying so, or with `fallback=true`
   leaves the graph unchanged and says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import fx, nn

from peftc.errors import PassError
from peftc.ir.graph import get_attr_path, peftc_meta, tag
from peftc.ir.options import Options, option
from peftc.ir.registry import PassResult, register_pass
from peftc.passes.multi_lora import register_kernel
from peftc.sites import LinearSite, weight_sites
from peftc.technique.adapters import adapters

__all__ = ["TritonOptions", "TritonLinear", "triton", "unavailable"]

MODULE = "triton_linears"


@dataclass(frozen=True)
class TritonOptions(Options):
    compile: bool = option(False, doc="also torch.compile the lowered graph's forward")
    fallback: bool = option(
        False, doc="where Triton cannot run, leave the graph unchanged instead of stopping"
    )


class TritonLinear(nn.Module):
    """One lowered site: calls `peftc::triton_linear` with its site's tensors (read from the
    graph)."""

    def __init__(
        self,
        site: str,
        out_features: int,
        in_features: int,
        blocksize: int,
        scale: float,
        dropout: float,
    ):
        super().__init__()
        self.site, self.out_features, self.in_features, self.blocksize = (
            site,
            out_features,
            in_features,
            blocksize,
        )
        self.scale, self.dropout = scale, dropout

    def forward(self, x, weight, packed, absmax, absmax_scale, offset, bias, lora_A, lora_B):
        from peftc.backends.triton.ops import triton_linear

        dropout = self.dropout if self.training else 0.0
        seed = int(torch.randint(0, 2**31 - 1, ())) if dropout > 0 else 0
        return triton_linear(
            x,
            weight,
            packed,
            absmax,
            absmax_scale,
            offset,
            bias,
            lora_A,
            lora_B,
            self.scale,
            dropout,
            seed,
            self.out_features,
            self.in_features,
            self.blocksize,
        )[0]

    def extra_repr(self) -> str:
        return (
            f"{self.site}: in={self.in_features}, out={self.out_features}, scale={self.scale}, "
            f"dropout={self.dropout}"
        )


def unavailable(gm: fx.GraphModule) -> str | None:
    """Why Triton kernels cannot run on this graph's tensors here, or None."""
    try:
        from peftc.backends.triton.ops import interpreting
    except ImportError:
        return "Triton is not installed (pip install 'peftc[triton]')"
    device = next(
        (t.device for t in gm.parameters()),
        next((t.device for t in gm.buffers()), torch.device("cpu")),
    )
    if device.type == "cuda" or interpreting():
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return (
            "TRITON_INTERPRET=1 was set after Triton's kernels were imported; set it before Python "
            "starts (TRITON_INTERPRET=1 python ...)"
        )
    return (
        f"the graph's tensors are on {device.type}, and Triton kernels run on a CUDA device: move "
        "the model to the GPU before capture, or run on the CPU interpreter with "
        "TRITON_INTERPRET=1 set before Python starts (slow; for tests)"
    )


def _multi_lora_kernel(gm: fx.GraphModule):
    reason = unavailable(gm)
    if reason is not None:
        raise PassError(f"multi_lora(kernel='triton'): {reason}; or use kernel='torch'")
    from peftc.backends.triton import ops  # noqa: F401  (registers peftc::triton_multi_lora_delta)

    return torch.ops.peftc.triton_multi_lora_delta.default


register_kernel("triton", _multi_lora_kernel)


@register_pass("triton", options=TritonOptions, preserves_outputs=True)
def triton(gm: fx.GraphModule, options: TritonOptions) -> PassResult:
    """Lower LoRA linear sites (dense or NF4 base) and bare NF4 linears to fused Triton kernels
    (training).

    Apply it last: afterwards adapters cannot be added, switched or merged. Needs a CUDA device or
    TRITON_INTERPRET=1; `fallback=true` leaves the graph unchanged where neither is there;
    `compile=true` also compiles the forward with torch.compile. See docs/triton.md.
    """
    lowered = peftc_meta(gm).get("lowered")
    if lowered is not None:
        raise PassError(
            f"triton: this graph is already lowered by {lowered['backend']!r}; apply 'triton' "
            "once, last ('triton' and 'outline' do not combine yet)"
        )
    reason = unavailable(gm)
    if reason is not None:
        if options.fallback:
            return PassResult(
                gm, modified=False, report=f"graph left unchanged (fallback=true): {reason}"
            )
        raise PassError(
            f"triton: {reason}; or pass triton(fallback=true) to keep the graph unchanged"
        )
    plans, skipped = _match(gm)
    if not plans:
        return PassResult(
            gm,
            modified=False,
            report="no LoRA linear site and no NF4 linear to lower"
            + (f"; left: {_counts(skipped)}" if skipped else ""),
        )
    gm.add_submodule(MODULE, nn.Module())
    for site, record in plans:
        _lower(gm, site, record)
    gm.graph.lint()
    gm.recompile()
    peftc_meta(gm)["lowered"] = {"backend": "triton", "sites": [s.path for s, _ in plans]}
    if options.compile:
        gm.compile()
    lora = sum(1 for _, r in plans if r is not None)
    report = f"lowered {len(plans)} sites ({lora} LoRA, {len(plans) - lora} bare NF4)"
    return PassResult(
        gm,
        modified=True,
        sites=tuple(s.path for s, _ in plans),
        report=report
        + (f"; left: {_counts(skipped)}" if skipped else "")
        + ("; forward compiled with torch.compile" if options.compile else ""),
    )


def _counts(skipped: dict[str, str]) -> str:
    reasons: dict[str, int] = {}
    for why in skipped.values():
        reasons[why] = reasons.get(why, 0) + 1
    return ", ".join(f"{n} {why}" for why, n in reasons.items())


def _match(gm: fx.GraphModule):
    """(site, LoRA record or None) for each site to lower; {path: why not} for adapted sites left
    alone."""
    records = [r for r in adapters(gm).values() if r.active and not r.merged]
    plans, skipped = [], {}
    for site in weight_sites(gm):
        here = [r for r in records if (site.path, site.kind) in r.sites]
        if not isinstance(site, LinearSite) or site.storage not in ("dense", "nf4"):
            if here:
                skipped[site.path] = f"{site.kind} sites"
            continue
        if not here:
            if site.storage == "nf4":
                plans.append((site, None))
            continue
        record = here[0]
        if len(here) > 1:
            skipped[site.path] = "sites with several adapters"
        elif (
            record.technique != "lora"
            or record.options.dora
            or record.stages.get(site.path) != "add"
        ):
            skipped[site.path] = (
                f"{'DoRA' if record.technique == 'lora' else record.technique} sites"
            )
        else:
            plans.append((site, record))
    return plans, skipped


def _lower(gm: fx.GraphModule, site: LinearSite, record) -> None:
    graph, base = gm.graph, site.node
    nodes = [n for n in graph.nodes if n.meta.get("peftc", {}).get("site") == site.path]
    exit_node = next((n for n in nodes if n.meta["peftc"].get("exit") == base.name), base)
    options = record.options_at(site.path) if record else None
    scale, dropout = (options.scaling, options.dropout) if options else (1.0, 0.0)
    name = f"{MODULE}.{site.path.replace('.', '_')}"
    with graph.inserting_before(exit_node.next):  # in creation order, after the site
        if site.storage == "nf4":
            x, packed, absmax, absmax_scale, offset, bias, out_features, in_features, blocksize = (
                base.args
            )
            weight = None
        # the captured op may be addmm or matmul (GPT-2's Conv1D): read the site's own tensors
        else:
            x, packed, absmax, absmax_scale, offset = site.input, None, None, None, None
            out_features, in_features, blocksize = site.out_features, site.in_features, 0
            weight = _get(graph, site.weight)
            if site.fan_in_fan_out:
                weight = graph.call_function(torch.ops.aten.t.default, (weight,))
            bias = _get(graph, site.bias) if site.bias else None
        lora = (
            [_get(graph, record.names[site.path][attr]) for attr in ("lora_A", "lora_B")]
            if record
            else [None, None]
        )
        gm.add_submodule(
            name, TritonLinear(site.path, out_features, in_features, blocksize, scale, dropout)
        )
        fused = graph.call_module(
            name, (x, weight, packed, absmax, absmax_scale, offset, bias, *lora)
        )
    tag(fused, pass_name="triton", role="fused_linear", path=site.path, type_name="TritonLinear")
    fused.meta["val"] = exit_node.meta.get("val")
    exit_node.replace_all_uses_with(fused, delete_user_cb=lambda user: user is not fused)
    dead = [n for n in nodes + [base] if n is not fused]
    while any(not n.users for n in dead):  # the site's old nodes, users first
        for n in [n for n in dead if not n.users]:
            graph.erase_node(n)
            dead.remove(n)


def _get(graph: fx.Graph, qualname: str) -> fx.Node:
    found = next((n for n in graph.find_nodes(op="get_attr") if get_attr_path(n) == qualname), None)
    return found if found is not None else graph.get_attr(qualname)
