"""Region sites (peftc/regions.py, cases 1-4) on real tiny transformers, checked against what the
eager model computes."""

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import peftc
from peftc.errors import TargetError
from peftc.ir.graph import clone
from peftc.sites.regions import attention_sites, block_sites, final_hidden_states, input_embeddings

from conftest import captured, loaded

ARCHS = ["llama", "qwen2", "gpt2", "bert"]
CAUSAL = {"llama": True, "qwen2": True, "gpt2": True, "bert": False}
# The modules whose outputs are the attention / feed-forward sublayer outputs added to the stream.
SUBLAYERS = {
    "llama": ("model.layers.{}.self_attn", "model.layers.{}.mlp"),
    "qwen2": ("model.layers.{}.self_attn", "model.layers.{}.mlp"),
    "gpt2": ("transformer.h.{}.attn", "transformer.h.{}.mlp"),
    # dropout after is identity
    "bert": (
        "encoder.layer.{}.attention.output.dense",
        "encoder.layer.{}.output.dense",
    ),
}


def run(gm, lm, *args):
    """Every node's value on `args` (default: the example inputs)."""
    interpreter = fx.Interpreter(gm, garbage_collect_values=False)
    interpreter.run(*(args or (*lm.args, *lm.kwargs.values())))
    return interpreter.env


def eager_hidden_states(lm):
    return lm.model(*lm.args, **lm.kwargs, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_sites_carry_heads_mask_and_scale(arch):
    gm, lm = captured(f"tiny-{arch}"), loaded(f"tiny-{arch}")
    config = lm.model.config
    kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    sites = attention_sites(gm)
    assert len(sites) == 2
    env = run(gm, lm)
    for site in sites:
        assert (site.num_heads, site.num_kv_heads, site.head_dim) == (4, kv_heads, 16)
        assert (site.scale, site.dropout_p, site.is_causal, site.enable_gqa) == (
            0.25,
            0.0,
            False,
            False,
        )
        key, key_heads = env[site.key], env[site.key_heads]
        assert key_heads.shape[1] == kv_heads
        # repeat_kv: each key/value head serves num_heads / kv_heads query heads
        torch.testing.assert_close(
            key, key_heads.repeat_interleave(4 // kv_heads, dim=1), rtol=0, atol=0
        )
        torch.testing.assert_close(
            env[site.value],
            env[site.value_heads].repeat_interleave(4 // kv_heads, dim=1),
            rtol=0,
            atol=0,
        )
        assert (site.key_heads is site.key) == (kv_heads == 4)


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_mask_is_the_models_mask(arch):
    """With right padding, the mask SDPA gets lets query i see key j iff j is no padding (and j <= i
    if causal)."""
    gm, lm = captured(f"tiny-{arch}"), loaded(f"tiny-{arch}")
    ids = lm.args[0]
    padding = torch.ones_like(ids)
    padding[1, -5:] = 0
    env = run(gm, lm, ids, padding)
    seq = ids.shape[1]
    allowed = padding.bool()[:, None, None, :].expand(-1, 1, seq, seq)
    if CAUSAL[arch]:
        allowed = allowed & torch.ones(seq, seq, dtype=torch.bool).tril()
    for site in attention_sites(gm):
        assert site.is_causal is False  # transformers passes causality in the mask under export
        mask = env[site.mask]
        assert mask.dtype == torch.bool
        torch.testing.assert_close(mask.expand_as(allowed), allowed)


def test_enable_gqa_has_no_repeat(monkeypatch):
    # transformers then leaves the repeat to SDPA
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    lm = loaded("tiny-llama")
    gm = peftc.capture(lm.model, lm.args, lm.kwargs)
    for site in attention_sites(gm):
        assert site.enable_gqa and site.key_heads is site.key and site.value_heads is site.value
        assert (site.num_heads, site.num_kv_heads, site.head_dim) == (4, 2, 16)
    torch.testing.assert_close(
        gm(*lm.args, *lm.kwargs.values()).logits, lm.model(*lm.args, **lm.kwargs).logits
    )


def test_causal_sdpa_without_mask_traced_symbolically():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(32, 3 * 32)

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = self.qkv(x).view(b, s, 3, 4, 8).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True, scale=0.5)

    gm = peftc.capture(Attention(), (torch.randn(2, 5, 32),), method="symbolic")
    (site,) = attention_sites(gm)
    assert (site.mask, site.is_causal, site.dropout_p, site.scale) == (None, True, 0.1, 0.5)
    assert (site.num_heads, site.num_kv_heads, site.head_dim, site.key_heads) == (4, 4, 8, site.key)


def zero_sublayer(gm: fx.GraphModule, which: str) -> fx.GraphModule:
    """A copy where every block's `which` output (attention_output or ff_output) is replaced by
    zeros."""
    gm = clone(gm)
    for block in block_sites(gm):
        node = getattr(block, which)
        with gm.graph.inserting_after(node):
            zeros = gm.graph.call_function(torch.ops.aten.zeros_like.default, (node,))
        node.replace_all_uses_with(
            zeros, delete_user_cb=lambda user, zeros=zeros: user is not zeros
        )
    gm.recompile()
    return gm


def zeroed_eager(lm, module_paths):
    """The eager model's output with those modules' outputs zeroed by forward hooks."""

    def hook(module, args, out):
        return (
            (torch.zeros_like(out[0]), *out[1:])
            if isinstance(out, tuple)
            else torch.zeros_like(out)
        )

    handles = [lm.model.get_submodule(p).register_forward_hook(hook) for p in module_paths]
    try:
        return lm.model(*lm.args, **lm.kwargs)[0]
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("which", ["attention_output", "ff_output"])
def test_block_sublayer_outputs_are_what_the_model_adds_to_the_stream(arch, which):
    gm, lm = captured(f"tiny-{arch}"), loaded(f"tiny-{arch}")
    blocks = block_sites(gm)
    assert [b.index for b in blocks] == [0, 1]
    pattern = SUBLAYERS[arch][which == "ff_output"]
    expected = zeroed_eager(lm, [pattern.format(b.index) for b in blocks])
    got = zero_sublayer(gm, which)(*lm.args, *lm.kwargs.values())[0]
    torch.testing.assert_close(got, expected)
    # zeroing it changes the model
    assert not torch.allclose(expected, lm.model(*lm.args, **lm.kwargs)[0])


def test_block_sublayers_are_found_through_adapter_branches():
    gm = peftc.apply(captured("tiny-llama"), 'lora(r=4, targets="all-linear")')
    for block in block_sites(gm):
        assert block.attention_output.meta["peftc"]["role"] == "output"
        assert block.attention_output.meta["module_path"] == f"{block.path}.self_attn.o_proj"
        assert block.ff_output.meta["module_path"] == f"{block.path}.mlp.down_proj"


@pytest.mark.parametrize(
    "arch,path,distinct",
    [
        ("llama", "model.embed_tokens", False),
        ("gpt2", "transformer.wte", True),
        ("bert", "embeddings.word_embeddings", True),
    ],
)
def test_input_embeddings(arch, path, distinct):
    gm, lm = captured(f"tiny-{arch}"), loaded(f"tiny-{arch}")
    (site,) = input_embeddings(gm)
    assert site.path == path and site.ids.target == "input_ids"
    assert (
        site.stream is not site.node
    ) == distinct  # position / token-type embeddings are added after the lookup
    assert site.stream is block_sites(gm)[0].input
    env = run(gm, lm)
    torch.testing.assert_close(
        env[site.node], lm.model.get_input_embeddings()(lm.args[0]), rtol=0, atol=0
    )
    torch.testing.assert_close(env[site.stream], eager_hidden_states(lm)[0])


def test_input_embeddings_of_encoder_decoder_and_targets():
    sites = input_embeddings(captured("tiny-t5"))
    assert [(s.ids.target, s.stream is not None) for s in sites] == [
        ("input_ids", True),
        ("decoder_input_ids", True),
    ]
    assert len(input_embeddings(captured("tiny-t5"), "decoder.*")) == 1
    with pytest.raises(TargetError, match="no input embedding"):
        input_embeddings(captured("tiny-llama"), "*.q_proj")


@pytest.mark.parametrize(
    "arch,path,norm",
    [
        ("llama", "model.norm", "model.norm"),
        ("gpt2", "transformer.ln_f", "transformer.ln_f"),
        ("bert", "encoder.layer.1", None),
    ],
)
def test_final_hidden_state_is_the_last_hidden_state(arch, path, norm):
    gm, lm = captured(f"tiny-{arch}"), loaded(f"tiny-{arch}")
    (site,) = final_hidden_states(gm)
    assert (site.path, site.norm) == (path, norm)
    env = run(gm, lm)
    # transformers' last hidden state is taken after the final norm
    expected = eager_hidden_states(lm)[-1]
    torch.testing.assert_close(env[site.node].reshape(expected.shape), expected)
    head = peftc.lm_head(gm)
    if head is not None:  # the head reads it (through llama's logits_to_keep slice, gpt2's view)
        torch.testing.assert_close(
            env[head.input].reshape(expected.shape),
            env[site.node].reshape(expected.shape),
            rtol=0,
            atol=0,
        )


def test_final_hidden_states_of_each_stack():
    sites = final_hidden_states(captured("tiny-t5"))
    assert [(s.blocks, s.norm) for s in sites] == [
        ("encoder.block", "encoder.final_layer_norm"),
        ("decoder.block", "decoder.final_layer_norm"),
    ]


def test_no_blocks_no_regions():
    gm = peftc.capture(
        nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4),), method="symbolic"
    )
    assert (
        block_sites(gm),
        attention_sites(gm),
        input_embeddings(gm),
        final_hidden_states(gm),
    ) == ([], [], [], [])
