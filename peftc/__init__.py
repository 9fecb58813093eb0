"""peftc: a compiler for parameter-efficient finetuning.

    gm = peftc.capture(model, args=(input_ids,))
    gm = peftc.apply(gm, "freeze, dce")
    print(peftc.show(gm))
"""

from peftc import errors
from peftc import adapters
from peftc.capture import capture, export_program
from peftc.checkpoint import load_adapter, save_adapter
from peftc.graph import tag, tagged
from peftc.inspect import diff, save_graph, show, summary, to_dot, to_networkx
from peftc.pipeline import Pipeline, PipelineResult, Step, apply
from peftc.plan import MemoryPlan, plan
from peftc.registry import PassResult, register_pass, registered_passes
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

from peftc import passes  # noqa: E402  (registers the built-in passes)
from peftc.passes.multi_lora import adapter_ids  # noqa: E402
from peftc.generation import generate  # noqa: E402
from peftc import distributed  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "adapter_ids",
    "generate",
    "distributed",
    "capture",
    "export_program",
    "apply",
    "Pipeline",
    "PipelineResult",
    "Step",
    "plan",
    "MemoryPlan",
    "PassResult",
    "register_pass",
    "registered_passes",
    "show",
    "summary",
    "diff",
    "to_networkx",
    "to_dot",
    "save_graph",
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
    "adapters",
    "save_adapter",
    "load_adapter",
    "passes",
]
