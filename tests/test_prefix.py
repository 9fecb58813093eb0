"""Prefix tuning against HF peft (PrefixTuningConfig): outputs and gradients on the user's positions
for a GQA Llama, Qwen2, GPT-2 and BERT, the reparameterisation MLP, other batch sizes and lengths,
is_causal SDPA, errors."""

import copy
import math

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftc
import peftc.techniques.prefix
from peftc.errors import OptionError, PassError, TargetError
from peftc.ir.graph import tagged
from peftc.sites.regions import attention_sites, position_ids
from peftc.tools.models import example_inputs, tiny_model
from peftc.tools.parity import against_peft, close

from conftest import captured

# peft passes past_key_values (renamed cache)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TASKS = {
    "llama": "CAUSAL_LM",
    "qwen2": "CAUSAL_LM",
    "gpt2": "CAUSAL_LM",
    "bert": "FEATURE_EXTRACTION",
}


def padded_inputs(model, batch=3, seq=7):
    args, kwargs = example_inputs(model, batch=batch, seq=seq, seed=2)
    mask = kwargs["attention_mask"].clone()
    mask[0, :2] = 0  # left padding
    mask[1, -1] = 0  # right padding
    return args, {"attention_mask": mask}


def loss(out, seed=3):
    # a fixed random projection: BERT's final LayerNorm makes out.square().mean() nearly constant
    weight = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(seed))
    return (out * weight).sum()


def build_pair(arch, n=3, projection=False, hidden=None):
    model = tiny_model(arch)  # the model conftest captured at batch 2, length 16
    extra = f", encoder_hidden_size={hidden}" if hidden else ""
    gm = peftc.apply(
        captured(f"tiny-{arch}"),
        f"freeze, prefix(n={n}, prefix_projection={projection}{extra}, seed=1)",
    )
    config = peft.PrefixTuningConfig(
        task_type=TASKS[arch],
        num_virtual_tokens=n,
        prefix_projection=projection,
        **({"encoder_hidden_size": hidden} if hidden else {}),
    )
    peft_model = peft.get_peft_model(model, config)
    theirs = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    ours = {name: p for name, p in gm.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs), (sorted(ours), sorted(theirs))  # peft's names and shapes
    with torch.no_grad():
        for name, p in theirs.items():
            assert p.shape == ours[name].shape
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.5)
            ours[name].copy_(p)
    return peft_model, gm, theirs, ours


def assert_parity(peft_model, gm, theirs, ours, args, kwargs, arch):
    eager = kwargs if arch == "bert" else {**kwargs, "use_cache": False}
    expected, got = peft_model(*args, **eager)[0], gm(*args, **kwargs)[0]
    # [B, L, ...]: user positions only
    assert got.shape == expected.shape == (*args[0].shape, expected.shape[-1])
    base = peft_model.get_base_model()(*args, **eager)[0]
    assert (
        expected - base
    ).abs().max() > 1e-2  # the prefix changes the output, so parity means something
    close(got, expected, "outputs")
    loss(expected).backward()
    loss(got).backward()
    for name, p in theirs.items():
        assert p.grad.abs().max() > 0
        close(ours[name].grad, p.grad, f"gradient of {name}")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "bert"])
def test_parity_with_peft(arch, tmp_path):
    model = tiny_model(arch)  # the model conftest captured at batch 2, length 16
    args, kwargs = padded_inputs(model)
    config = peft.PrefixTuningConfig(task_type=TASKS[arch], num_virtual_tokens=3)
    parity = against_peft(
        model, args, kwargs, config, tmp_path, graph=peftc.apply(captured(f"tiny-{arch}"), "freeze")
    )
    assert parity.graph(*args, **kwargs)[0].shape[:2] == args[0].shape  # user positions only
    theirs = {name: p.shape for name, p in parity.peft.named_parameters() if p.requires_grad}
    made = peftc.apply(captured(f"tiny-{arch}"), "freeze, prefix(n=3)")
    assert {
        name: p.shape for name, p in made.named_parameters() if p.requires_grad
    } == theirs  # peft's names, shapes
    # GQA: the prefix has num_key_value_heads heads, as peft's token_dim
    if arch in (
        "llama",
        "qwen2",
    ):
        assert theirs["prompt_encoder.default.embedding.weight"] == (3, 2 * 2 * 2 * 16)


def test_parity_with_prefix_projection():
    peft_model, gm, theirs, ours = build_pair("llama", n=4, projection=True, hidden=24)
    assert {n: tuple(p.shape) for n, p in ours.items()} == {
        "prompt_encoder.default.embedding.weight": (4, 32),
        "prompt_encoder.default.transform.0.weight": (24, 32),
        "prompt_encoder.default.transform.0.bias": (24,),
        "prompt_encoder.default.transform.2.weight": (128, 24),
        "prompt_encoder.default.transform.2.bias": (128,),
    }
    assert_parity(
        peft_model,
        gm,
        theirs,
        ours,
        *padded_inputs(peft_model.get_base_model(), batch=2, seq=11),
        "llama",
    )


def test_other_batch_sizes_and_lengths():
    peft_model, gm, theirs, ours = build_pair("gpt2", n=5)
    for batch, seq in ((1, 3), (4, 20)):
        args, kwargs = example_inputs(peft_model.get_base_model(), batch=batch, seq=seq, seed=batch)
        expected = peft_model(*args, **kwargs, use_cache=False)[0]
        close(gm(*args, **kwargs)[0], expected, f"outputs at batch {batch}, length {seq}")


def test_positions_are_shifted_and_masks_extended_once():
    gm = captured("tiny-llama")
    # rotary only, not the mask's
    assert [n.target for n in position_ids(gm)] == [torch.ops.aten.arange.default]
    out = peftc.apply(gm, "prefix(n=2)")
    assert len(tagged(out, **{"pass": "prefix"}, role="positions_shifted")) == 1
    # both layers share the mask
    assert len(tagged(out, **{"pass": "prefix"}, role="mask_with_prefix")) == 1
    assert [n.target for n in position_ids(captured("tiny-bert"))] == ["embeddings.position_ids"]


class CausalAttention(nn.Module):
    """One attention with `is_causal=True` and no mask, and its eager reference with an explicit
    prefix."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads, self.qkv = heads, nn.Linear(d, 3 * d)

    def split(self, x):
        b, s, _ = x.shape
        return [t.reshape(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1)]

    def forward(self, x):
        q, k, v = self.split(x)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def reference(self, x, pk, pv):
        q, k, v = self.split(x)
        b, n, s = x.shape[0], pk.shape[1], x.shape[1]
        k, v = (
            torch.cat([pk.expand(b, -1, -1, -1), k], 2),
            torch.cat([pv.expand(b, -1, -1, -1), v], 2),
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        visible = torch.arange(n + s)[None, :] <= torch.arange(s)[:, None] + n
        return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


def test_is_causal_without_mask_against_eager_reference():
    module = CausalAttention().eval()
    x = torch.randn(2, 5, 32)
    gm = peftc.apply(peftc.capture(module, (x,)), "prefix(n=3, seed=0)")
    site = attention_sites(gm)[0]  # site queries read the op as captured ...
    assert site.mask is None and site.is_causal is True
    # ... it now has a mask
    assert site.node.kwargs["attn_mask"] is not None and site.node.kwargs["is_causal"] is False
    flat = gm.get_parameter("prompt_encoder.default.embedding.weight")
    kv = flat.reshape(3, 2, 4, 8).permute(1, 2, 0, 3)
    for y in (x, torch.randn(3, 9, 32)):
        close(gm(y), module.reference(y, kv[0], kv[1]), "outputs")


def test_errors():
    gm = peftc.capture(CausalAttention(), (torch.randn(2, 5, 32),))
    with pytest.raises(OptionError, match="n .*positive"):
        peftc.apply(gm, "prefix(n=0)")
    with pytest.raises(TargetError):
        peftc.apply(gm, "prefix(n=2, targets='*.nothing_here')")
    plain = peftc.capture(nn.Sequential(nn.Linear(4, 4)), (torch.randn(2, 4),))
    with pytest.raises(PassError, match="no attention sites"):
        peftc.apply(plain, "prefix(n=2)")


def test_sequence_classifier_where_peft_fails():
    """peft refuses prefix tuning on LlamaForSequenceClassification under transformers 5 ("Model
    does not support past key values"); peftc's logits equal the score head on peft's causal-LM
    final hidden states, same weights."""
    import transformers

    from peftc.tools.models import tiny_config

    config = tiny_config("llama")
    config.pad_token_id = 0
    config.num_labels = 3
    torch.manual_seed(0)
    classifier = transformers.LlamaForSequenceClassification(config).eval()
    lm = transformers.LlamaForCausalLM(config).eval()
    lm.model.load_state_dict(classifier.model.state_dict())
    args, kwargs = example_inputs(classifier)
    gm = peftc.apply(peftc.capture(classifier, args, kwargs), "freeze, prefix(n=3, seed=1)")
    with pytest.raises(Exception, match="past key values"):
        config = peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)
        peft.get_peft_model(copy.deepcopy(classifier), config)(*args, **kwargs)
    peft_lm = peft.get_peft_model(
        lm, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    )
    ours = gm.get_parameter("prompt_encoder.default.embedding.weight")
    theirs = peft_lm.get_parameter("prompt_encoder.default.embedding.weight")
    with torch.no_grad():
        theirs.copy_(ours)
    ids = example_inputs(classifier, batch=3, seq=6, seed=4)[0][0]
    mask = torch.ones_like(ids)
    ids[1, 4:], mask[1, 4:] = 0, 0  # right padding: the classifier pools token 3 of row 1
    captured = {}
    peft_lm.get_base_model().model.norm.register_forward_hook(
        lambda m, i, o: captured.setdefault("h", o)
    )
    peft_lm(ids, attention_mask=mask, use_cache=False)
    last = torch.tensor([5, 3, 5])
    expected = classifier.score(captured["h"])[torch.arange(3), last]
    got = gm(ids, attention_mask=mask)[0]
    assert (got - classifier(ids, attention_mask=mask)[0]).abs().max() > 1e-2
    close(got, expected, "logits")


def test_checkpoints_both_ways(tmp_path):
    """Through the one checkpoint path every technique uses (peftc.save_adapter / load_adapter)."""
    from peftc.technique.checkpoint import CheckpointError

    # peft-saved (trained with the projection; the file holds its output) -> peftc
    peft_model, gm, theirs, ours = build_pair("llama", n=4, projection=True)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded_gm = peftc.load_adapter(captured("tiny-llama"), tmp_path / "peft")
    # the flat prefix, as peft's
    assert not any(".transform." in name for name, _ in loaded_gm.named_parameters())
    args, kwargs = padded_inputs(peft_model.get_base_model())
    expected = peft_model(*args, **kwargs, use_cache=False)[0]
    close(loaded_gm(*args, **kwargs)[0], expected, "peftc on peft's checkpoint")
    # peftc-saved (projection evaluated) -> peft
    peftc.save_adapter(gm, tmp_path / "ours")
    reloaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours")
    close(
        reloaded(*args, **kwargs, use_cache=False)[0],
        gm(*args, **kwargs)[0],
        "peft on peftc's checkpoint",
    )
    with pytest.raises(CheckpointError, match="does not fit this model"):
        peftc.load_adapter(captured("tiny-gpt2"), tmp_path / "ours")
    # a second prefix is another adapter, one active at a time
    flat = peftc.apply(captured("tiny-llama"), "prefix(n=4)")
    with pytest.raises(OptionError, match="an adapter named 'default' exists"):
        peftc.load_adapter(flat, tmp_path / "peft")
    with pytest.raises(OptionError, match="would be active together"):
        peftc.apply(flat, "prefix(n=2, adapter='other')")
    both = peftc.load_adapter(
        peftc.apply(flat, "disable_adapters"), tmp_path / "peft", adapter="trained"
    )
    close(both(*args, **kwargs)[0], expected, "the second adapter")
    switched = peftc.apply(both, "set_adapter(name='default')")
    torch.testing.assert_close(switched(*args, **kwargs)[0], flat(*args, **kwargs)[0])


class MaskedAttention(CausalAttention):
    def forward(self, x, mask):
        q, k, v = self.split(x)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# the heads dim of the mask broadcasts
@pytest.mark.filterwarnings("ignore:input 'mask' has size 1")
def test_float_mask_gets_zero_columns_in_front():
    module = MaskedAttention().eval()
    x = torch.randn(2, 5, 32)
    mask = torch.zeros(2, 1, 5, 5)
    mask[0, :, :, :2] = float("-inf")  # row 0 hides its first two keys
    gm = peftc.apply(peftc.capture(module, (x, mask)), "prefix(n=3, seed=0)")
    kv = (
        gm.get_parameter("prompt_encoder.default.embedding.weight")
        .reshape(3, 2, 4, 8)
        .permute(1, 2, 0, 3)
    )
    q, k, v = module.split(x)
    k = torch.cat([kv[0].expand(2, -1, -1, -1), k], 2)
    v = torch.cat([kv[1].expand(2, -1, -1, -1), v], 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8) + F.pad(mask, (3, 0))
    close(gm(x, mask), scores.softmax(-1) @ v, "outputs")
