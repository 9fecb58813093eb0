"""Generic passes: `identity`, `dce`, `freeze`."""

from __future__ import annotations

from torch import fx

from peftc.ir.graph import freeze_parameters
from peftc.ir.registry import PassResult, register_pass

__all__ = ["identity", "dce", "freeze"]


@register_pass("identity", preserves_outputs=True)
def identity(gm: fx.GraphModule) -> PassResult:
    """Change nothing: `gm -> gm`. Useful to check a pipeline's plumbing."""
    return PassResult(gm, modified=False, report="identity changes nothing by definition")


@register_pass("dce", preserves_outputs=True)
def dce(gm: fx.GraphModule) -> PassResult:
    """Dead-code elimination: `graph -> graph without nodes whose results are unused`.

    1. Pure nodes with no users are erased, repeatedly, as `Graph.eliminate_dead_code` does.
    2. Impure nodes (in-place ops, RNG, `call_module`) stay.
    Parameters stay registered even when no node reads them any more, so state_dict keys
    keep matching the original model's.
    """
    before = len(gm.graph.nodes)
    modified = gm.graph.eliminate_dead_code()
    return PassResult(gm, modified=modified, report=f"erased {before - len(gm.graph.nodes)} nodes")


@register_pass("freeze", preserves_outputs=True)
def freeze(gm: fx.GraphModule) -> PassResult:
    """Freeze every parameter: `requires_grad=True -> False`.

    Each parameter is replaced by a new frozen `nn.Parameter` over the same storage, so the
    model the graph was captured from keeps its own `requires_grad` flags.
    """
    frozen = freeze_parameters(gm)
    owners = sorted({name.rpartition(".")[0] for name in frozen})
    report = f"froze {len(frozen)} parameters" if frozen else "every parameter was already frozen"
    return PassResult(gm, modified=bool(frozen), sites=tuple(owners), report=report)
