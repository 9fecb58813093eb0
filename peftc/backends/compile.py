"""Lower a rewritten graph through `torch.compile` (Inductor: C++/OpenMP on CPUs, Triton on GPUs).

    fast = peftc.compile(gm)            # a module: call it, train it, as gm
    loss = lm_loss(fast(ids, attention_mask=mask).logits); loss.backward()
    fast.compiles                       # graphs compiled so far (1 across batch sizes and lengths)

1. The graph is compiled whole (`fullgraph=True`): peftc's graphs have no Python branching, and
   peftc's own ops (`peftc::nf4_linear`, `peftc::multi_lora_delta`, ...) are `torch.library`
   custom ops with fake kernels, which Inductor calls as they are. A graph break is an error that
   names its cause, never a silent fallback to eager.
2. Dropout draws its masks from ATen's generator (Inductor's `fallback_random`): a seeded
   compiled step draws the masks the eager graph draws.
3. The dims the capture left dynamic (dims 0 and 1 of each input: batch and sequence) are marked
   dynamic before the first call, so one compiled graph serves every batch size and length; dims
   export fixed (`meta["static_dims"]`) stay static. `compiles` counts the graphs compiled (train
   and eval mode are one each).
4. A graph sharded by FSDP2 (`peftc.distributed.shard`: `fully_shard` on each outlined block and
   the root) compiles block by block, each block whole, as torchtitan compiles FSDP2 models: the
   root runs eagerly, so FSDP2 gathers each block's weights between compiled blocks. `compiles`
   counts every block's graphs; a block sees a second shape once before its dims turn dynamic.
5. Parameters are the graph module's: the optimizer, `train()`/`eval()` and
   `peftc.save_adapter(fast.graph_module, ...)` act on the same tensors and modules;
   `state_dict()` and `load_state_dict()` use the graph module's keys (no wrapper prefix).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from peftc.errors import PeftcError
from peftc.ir.graph import peftc_meta

__all__ = ["compile", "Compiled", "CompileError"]


class CompileError(PeftcError):
    """torch.compile could not take the graph whole."""


class Compiled(nn.Module):
    """`graph_module` compiled by `torch.compile(fullgraph=True)`; see the module docstring."""

    def __init__(self, gm: fx.GraphModule, *, backend: str, mode: str | None, dynamic: bool):
        super().__init__()
        self.graph_module = gm
        self.compiles = 0
        self._dynamic = dynamic
        inner = torch._dynamo.lookup_backend(backend)
        patches = {}
        if backend == "inductor":
            # dropout draws from ATen's generator: eager's masks, and on CPUs faster than
            # Inductor's own random numbers (MiniLM, dropout 0.1: 500 -> 415 ms a step)
            modes = torch._inductor.list_mode_options(mode) if mode else {}
            options = {**modes, "fallback_random": True}
            patches = {"config_patches": options}

        def counted(graph: fx.GraphModule, example_inputs: list) -> Any:
            self.compiles += 1
            return inner(graph, example_inputs, **patches)

        if _sharded(gm):
            self._compile_blocks(gm, counted)
            self._compiled = gm
        else:
            self._compiled = torch.compile(gm, backend=counted, fullgraph=True, dynamic=None)
        self._static = peftc_meta(gm).get("static_dims", {})
        self._names = [str(n.target) for n in gm.graph.find_nodes(op="placeholder")]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._dynamic:
            named = {**dict(zip(self._names, args, strict=False)), **kwargs}
            for name, value in named.items():
                self._mark_dynamic(name, value)
        try:
            return self._compiled(*args, **kwargs)
        except torch._dynamo.exc.Unsupported as e:
            raise CompileError(
                f"torch.compile could not take the graph whole: {str(e).splitlines()[0]}. Run the "
                "graph eagerly (it is `.graph_module`), and report what broke it"
            ) from e

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.graph_module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.graph_module.load_state_dict(state_dict, strict=strict, assign=assign)

    @staticmethod
    def _compile_blocks(gm: fx.GraphModule, backend: Any) -> None:
        from peftc.passes.outline import blocks

        for path in blocks(gm):
            gm.get_submodule(path).compile(backend=backend, fullgraph=True, dynamic=None)

    def _mark_dynamic(self, name: str, value: Any) -> None:
        if not isinstance(value, torch.Tensor):
            return
        fixed = self._static.get(name, {})
        for dim in range(min(value.dim(), 2)):
            if dim not in fixed:
                torch._dynamo.maybe_mark_dynamic(value, dim)


def _sharded(gm: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return isinstance(gm, FSDPModule)


def compile(
    gm: fx.GraphModule,
    *,
    backend: str = "inductor",
    mode: str | None = None,
    dynamic: bool = True,
) -> Compiled:
    """`gm` lowered through `torch.compile(fullgraph=True)`: a module computing what `gm` computes.

    `backend`: a torch.compile backend ("inductor"; "aot_eager" traces and differentiates without
    generating code); `mode`: Inductor's ("max-autotune", "reduce-overhead", ...); `dynamic`: mark
    batch and sequence dynamic so new shapes do not recompile."""
    if mode and backend != "inductor":
        raise CompileError(f"mode={mode!r} is an Inductor option; backend {backend!r} takes none")
    if not isinstance(gm, fx.GraphModule):
        raise CompileError(
            f"peftc.compile takes a captured graph (peftc.capture, peftc.apply), got "
            f"{type(gm).__name__}"
        )
    return Compiled(gm, backend=backend, mode=mode, dynamic=dynamic)
