"""peftc: a compiler for parameter-efficient finetuning.

    gm = peftc.capture(model, args=(input_ids,))
    gm = peftc.apply(gm, "freeze, lora(r=8)")
    print(peftc.show(gm))

The package is layered, each layer importing only those below it (docs/architecture.md; the
import-linter contract in pyproject.toml checks it): `ir` -> `sites` -> `technique` ->
`techniques` | `quant` | `passes` -> `backends` -> `tools`. This module is the public API and
imports every layer, which registers the built-in passes, techniques and weight formats.
"""

from peftc import errors, passes, quant, techniques
from peftc._version import __version__
from peftc.backends.compile import compile

# registers the `triton` pass
from peftc.backends.triton import lowering as _triton_lowering  # noqa: F401
from peftc.ir.capture import capture, export_program
from peftc.ir.graph import tag, tagged
from peftc.ir.pipeline import Pipeline, PipelineResult, Step, apply
from peftc.ir.registry import PassResult, register_pass, registered_passes
from peftc.passes.multi_lora import adapter_ids
from peftc.sites import (
    attention_sites,
    block_sites,
    conv_sites,
    embedding_sites,
    final_hidden_states,
    input_embeddings,
    layer_norm_sites,
    linear_sites,
    lm_head,
    rms_norm_sites,
    weight_sites,
)
from peftc.technique import register_technique
from peftc.technique.checkpoint import load_adapter, save_adapter
from peftc.tools import distributed
from peftc.tools.generation import generate
from peftc.tools.inspect import diff, save_graph, show, summary, to_dot, to_networkx
from peftc.tools.merged import save_merged
from peftc.tools.plan import MemoryPlan, plan

__all__ = [
    "__version__",
    "capture",
    "compile",
    "export_program",
    "apply",
    "Pipeline",
    "PipelineResult",
    "Step",
    "PassResult",
    "register_pass",
    "registered_passes",
    "register_technique",
    "save_adapter",
    "load_adapter",
    "save_merged",
    "show",
    "summary",
    "diff",
    "to_networkx",
    "to_dot",
    "save_graph",
    "plan",
    "MemoryPlan",
    "generate",
    "PeftcModel",
    "adapter_ids",
    "distributed",
    "weight_sites",
    "linear_sites",
    "conv_sites",
    "embedding_sites",
    "layer_norm_sites",
    "rms_norm_sites",
    "input_embeddings",
    "final_hidden_states",
    "attention_sites",
    "block_sites",
    "lm_head",
    "tag",
    "tagged",
    "errors",
    "passes",
    "quant",
    "techniques",
]


def __getattr__(name: str):
    # PeftcModel is a transformers PreTrainedModel: transformers (the `hf` extra) is imported only
    # when it is asked for
    if name == "PeftcModel":
        from peftc.tools.hf import PeftcModel

        return PeftcModel
    raise AttributeError(f"module 'peftc' has no attribute {name!r}")
