"""The sites layer: where techniques act, found by what the graph computes, and how weights are
stored.

`weight` (linear, conv, embedding, norm sites), `regions` (attention, blocks, sublayers, input
embeddings, final hidden states, position ids), `formats` (dense and registered quantized weight
storage), `selection` (a pass's kinds and targets, peft's default targets). Knows nothing of
techniques.
"""

from peftc.sites.regions import (
    AttentionSite,
    BlockSite,
    FinalHiddenState,
    InputEmbeddings,
    SublayerSite,
    attention_sites,
    block_sites,
    final_hidden_states,
    input_embeddings,
    position_ids,
    sublayer_sites,
)
from peftc.sites.selection import default_targets, resolve_sites, sites_of
from peftc.sites.weight import (
    ConvSite,
    EmbeddingSite,
    LayerNormSite,
    LinearSite,
    RMSNormSite,
    WeightSite,
    conv_sites,
    embedding_sites,
    layer_norm_sites,
    linear_sites,
    lm_head,
    rms_norm_sites,
    weight_site_at,
    weight_sites,
)

__all__ = [
    "WeightSite",
    "LinearSite",
    "ConvSite",
    "EmbeddingSite",
    "LayerNormSite",
    "RMSNormSite",
    "AttentionSite",
    "BlockSite",
    "SublayerSite",
    "InputEmbeddings",
    "FinalHiddenState",
    "weight_sites",
    "linear_sites",
    "conv_sites",
    "embedding_sites",
    "layer_norm_sites",
    "rms_norm_sites",
    "attention_sites",
    "block_sites",
    "sublayer_sites",
    "input_embeddings",
    "final_hidden_states",
    "position_ids",
    "weight_site_at",
    "lm_head",
    "sites_of",
    "resolve_sites",
    "default_targets",
]
