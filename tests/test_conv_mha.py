"""LoRA, DoRA, LoHa and LoKr on Conv1d/2d/3d and LoRA on nn.MultiheadAttention against HF peft 0.21.

Each case is `peftc.tools.parity.against_peft`: peft's adapter with random weights, loaded into
peftc, outputs and every adapter gradient, peftc's checkpoint in peft, merge and unmerge.
"""

import functools
import json

import peft
import pytest
import torch
from torch import nn

import peftc
import peftc.techniques.loha
import peftc.techniques.lokr
import peftc.techniques.lora
from peftc.errors import OptionError, PeftcError
from peftc.technique import NotMergeable
from peftc.tools.parity import against_peft, close

from conftest import fill_trainable


class ConvNet(nn.Module):
    """Conv1d (padded), grouped strided Conv2d, 1x1 Conv2d, dilated Conv2d, Conv3d."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.c2b = nn.Conv2d(8, 6, 1)
        self.c2d = nn.Conv2d(6, 6, 3, padding=2, dilation=2, bias=False)
        self.c3 = nn.Conv3d(6, 4, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x):
        h = self.c1(x).reshape(x.shape[0], 8, 4, 4)
        h = self.c2d(self.c2b(self.c2(h)))
        return self.c3(h.unsqueeze(2))


class Attention(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.pre = nn.Linear(8, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)

    def forward(self, x):
        h = self.pre(x)
        return self.mha(h, h, h)[0]


@functools.cache
def captured(kind, batch_first=True):
    """The frozen base graph of `conv_model()` or `attention_model(batch_first)` (apply and load
    copy it)."""
    model, x = (
        (conv_model(), conv_input())
        if kind == "conv"
        else (attention_model(batch_first), attention_input(batch_first))
    )
    return peftc.apply(peftc.capture(model, (x,)), "freeze")


def conv_model():
    torch.manual_seed(0)
    return ConvNet()


def attention_model(batch_first):
    torch.manual_seed(0)
    return Attention(batch_first)


def conv_input():
    return torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(0))


def attention_input(batch_first):
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    return x if batch_first else x.transpose(0, 1).contiguous()


# case: (config, whether it merges: LoRA on the grouped c2 does not, as in peft)
CONV_CASES = {
    "lora": (peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c1", "c2", "c2b", "c3"]), False),
    "dora": (
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c1", "c2b", "c3"], use_dora=True),
        True,
    ),
    "dora-grouped": (
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c2"], use_dora=True),
        False,
    ),
    "loha": (peft.LoHaConfig(r=2, alpha=4, target_modules=["c1", "c2", "c2b", "c2d"]), True),
    "loha-effective": (
        peft.LoHaConfig(
            r=2, alpha=4, target_modules=["c1", "c2", "c2b", "c2d"], use_effective_conv2d=True
        ),
        True,
    ),
    "lokr": (peft.LoKrConfig(r=1, alpha=4, target_modules=["c1", "c2", "c2b", "c2d"]), True),
    "lokr-full-w2": (peft.LoKrConfig(r=8, alpha=4, target_modules=["c1", "c2", "c2d"]), True),
    # W1 (1, 1), Tucker cores everywhere
    "lokr-effective": (
        peft.LoKrConfig(
            r=2,
            alpha=4,
            target_modules=["c1", "c2", "c2d"],
            use_effective_conv2d=True,
            decompose_factor=1,
        ),
        True,
    ),
}


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_parity_with_peft(case, tmp_path):
    config, mergeable = CONV_CASES[case]
    parity = against_peft(
        conv_model(), (conv_input(),), {}, config, tmp_path, graph=captured("conv"), merge=mergeable
    )
    if not mergeable:
        with pytest.raises(NotMergeable):
            peftc.apply(parity.graph, "merge")


def test_lokr_conv_layouts_are_peft_s():
    """Conv1d with a full 3-D W2 (torch.kron's scrambled layout), the Tucker core, the factored
    W2."""
    gm = captured("conv")
    full = peftc.apply(gm, "lokr(r=8, targets='c1|c2')")
    shapes = {n: tuple(p.shape) for n, p in full.named_parameters() if "lokr" in n}
    assert shapes == {
        "c1.lokr_w1.default": (2, 2),
        "c1.lokr_w2.default": (4, 2, 3),
        "c2.lokr_w1.default": (2, 2),
        "c2.lokr_w2.default": (4, 2, 3, 3),
    }
    eff = peftc.apply(gm, "lokr(r=1, targets='c2', use_effective_conv2d=true)")
    assert {n: tuple(p.shape) for n, p in eff.named_parameters() if "lokr" in n} == {
        "c2.lokr_w1.default": (2, 2),
        "c2.lokr_t2.default": (1, 1, 3, 3),
        "c2.lokr_w2_a.default": (1, 4),
        "c2.lokr_w2_b.default": (1, 2),
    }


MHA_CONFIG = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["mha"])


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_multihead_attention_parity_with_peft(batch_first, tmp_path):
    x = attention_input(batch_first)
    parity = against_peft(
        attention_model(batch_first),
        (x,),
        {},
        MHA_CONFIG,
        tmp_path,
        graph=captured("mha", batch_first),
    )
    gm = parity.graph
    assert {n for n, _ in gm.named_parameters() if "lora" in n} == {
        "mha.lora_A.default.weight",
        "mha.lora_B.default.weight",
        "mha.base_layer.out_proj.lora_A.default.weight",
        "mha.base_layer.out_proj.lora_B.default.weight",
    }
    config = json.loads((tmp_path / "peftc" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["mha"]
    merged = parity.peft.merge_and_unload()  # peft's merge (out_proj's update twice) equals peftc's
    close(peftc.apply(gm, "merge")(x), merged(x), "merged in peft")


def test_multihead_attention_refusals(tmp_path):
    model, x = attention_model(True), attention_input(True)
    gm = captured("mha")
    for text, message in [
        (
            "lora(targets='mha', dora=true)",
            "peft does not support dora on nn.MultiheadAttention 'mha'",
        ),
        (
            "lora(targets='mha.out_proj')",
            "out_proj of nn.MultiheadAttention 'mha', whose forward never calls it",
        ),
        ("lora(targets='all-linear')", "peft's all-linear has no effect"),
        ("loha(targets='mha')", "loha: peft does not support nn.MultiheadAttention"),
        ("lokr(targets='mha.out_proj')", "lokr: peft does not support nn.MultiheadAttention"),
    ]:
        with pytest.raises(OptionError, match=message):
            peftc.apply(gm, text)
    with pytest.raises(OptionError, match=r"called whole .* capture the model with example inputs"):
        peftc.apply(peftc.capture(model), "lora(targets='mha')")

    class OtherDims(Attention):
        def __init__(self):
            super().__init__(True)
            self.mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True)

        def forward(self, x):
            return self.mha(x, x[..., :6], x[..., :6])[0]

    with pytest.raises(OptionError, match="kdim or vdim differ from embed_dim"):
        peftc.apply(peftc.capture(OtherDims(), (x,)), "lora(targets='mha')")


class Cross(Attention):
    """Query apart from key and value: in_proj_weight split in two (peft adapts it as one)."""

    def forward(self, x):
        return self.mha(self.pre(x), x, x)[0]


class Unbatched(Attention):
    """One (length, dim) sequence: query, key and value are three views, in_proj_weight split in
    three."""

    def forward(self, x):
        return self.mha(x[0], x[0], x[0])[0]


@pytest.mark.parametrize("model", [Cross, Unbatched])
def test_multihead_attention_with_split_projections_matches_peft(model, tmp_path):
    torch.manual_seed(0)
    module, x = model(True), attention_input(True)
    against_peft(module, (x,), {}, MHA_CONFIG, tmp_path)


def test_conv_refusals(tmp_path):
    gm = captured("conv")
    for text, error, message in [
        ("loha(targets='c3')", OptionError, r"loha: peft does not support Conv3d \('c3'\)"),
        ("lokr(targets='c3')", OptionError, r"lokr: peft does not support Conv3d \('c3'\)"),
        ("lora(r=3, targets='c2')", OptionError, r"r=3 must be divisible by the groups \(2\)"),
        ("lora(targets='c2d')", OptionError, "dilated convolution"),
        ("lokr(r=1, targets='c1', use_effective_conv2d=true)", OptionError, "r=1"),
        ("lora(targets='nothing_here')", PeftcError, "matches no"),
    ]:
        with pytest.raises(error, match=message):
            peftc.apply(gm, text)

    class Reflect(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")

        def forward(self, x):
            return self.c(x)

    reflect = peftc.capture(Reflect(), (torch.randn(2, 4, 5, 5),))
    for name in ("lora", "loha", "lokr"):
        with pytest.raises(OptionError, match=f"{name}: convolution 'c' pads in mode 'reflect'"):
            peftc.apply(reflect, f"{name}(targets='c')")

    class Flat3d(nn.Module):  # kernel (1, 1, k): peft takes it for a 1x1 Conv2d and its merge fails
        def __init__(self):
            super().__init__()
            self.c = nn.Conv3d(4, 4, (1, 1, 3))

        def forward(self, x):
            return self.c(x)

    flat = fill_trainable(
        peftc.apply(
            peftc.capture(Flat3d(), (torch.randn(2, 4, 2, 2, 5),)), "lora(r=2, targets='c')"
        )
    )
    with pytest.raises(NotMergeable, match="peft's merge fails"):
        peftc.apply(flat, "merge")


@pytest.mark.parametrize("method", [peft.LoHaConfig, peft.LoKrConfig])
def test_lycoris_dropouts_train_as_peft_on_conv1d(method, tmp_path):
    # training mode, one random state for both sides: the same output channels dropped
    config = method(r=2, target_modules=["c1"], rank_dropout=0.5)
    parity = against_peft(
        conv_model(), (conv_input(),), {}, config, tmp_path, graph=captured("conv"), train=True
    )
    assert parity.reloaded is not None


def test_lycoris_refuses_gpt2_conv1d():
    from transformers.pytorch_utils import Conv1D

    class Gpt2Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = Conv1D(8, 4)

        def forward(self, x):
            return self.c_fc(x)

    gm = peftc.capture(Gpt2Mlp(), (torch.randn(2, 3, 4),))
    for name in ("loha", "lokr"):
        with pytest.raises(
            OptionError, match=rf"{name}: peft does not support GPT-2's Conv1D \('c_fc'\)"
        ):
            peftc.apply(gm, f"{name}(targets='c_fc')")


def test_pass_text_round_trip():
    gm = captured("conv")
    out = peftc.apply(gm, "loha(r=2, targets='c1|c2', use_effective_conv2d=true)")
    assert {n for n, _ in out.named_parameters() if "hada_t" in n} == {
        "c1.hada_t1.default",
        "c1.hada_t2.default",
        "c2.hada_t1.default",
        "c2.hada_t2.default",
    }


class StringPadding(nn.Module):
    """Convolutions with padding="valid" (SigLIP's patch embedding) and "same"."""

    def __init__(self):
        super().__init__()
        self.valid = nn.Conv2d(3, 8, 2, stride=2, padding="valid")
        self.same = nn.Conv2d(8, 8, 3, padding="same")
        self.head = nn.Linear(8 * 16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.same(self.valid(x))).flatten(1))


@pytest.mark.parametrize(
    "config",
    [
        peft.LoraConfig(r=2, target_modules=["valid", "same"]),
        peft.LoraConfig(r=2, target_modules=["valid", "same"], use_dora=True),
        peft.LoHaConfig(r=2, target_modules=["valid", "same"]),
        peft.IA3Config(target_modules=["valid", "same"], feedforward_modules=[]),
    ],
    ids=["lora", "dora", "loha", "ia3"],
)
def test_string_padding_convolutions_are_sites(config, tmp_path):
    torch.manual_seed(0)
    model = StringPadding().eval()
    parity = against_peft(model, (torch.randn(2, 3, 8, 8),), {}, config, tmp_path)
    assert parity.merged is not None and parity.reloaded is not None


def _wav2vec2(groups):
    import transformers

    from peftc.tools.models import example_inputs, tiny_config

    config = tiny_config("wav2vec2")
    config.num_conv_pos_embedding_groups = groups
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForCTC(config).eval()  # peft saves it without token embeddings
    return model, *example_inputs(model)


@pytest.mark.parametrize(
    "config",
    [
        peft.LoraConfig(r=4, target_modules=["pos_conv_embed.conv"]),
        peft.LoraConfig(r=4, target_modules=["pos_conv_embed.conv"], use_dora=True),
        peft.LoHaConfig(r=4, target_modules=["pos_conv_embed.conv"]),
    ],
    ids=["lora", "dora", "loha"],
)
@pytest.mark.parametrize("groups", [4, 1])
def test_weight_normed_convolutions_are_sites(config, groups, tmp_path):
    """wav2vec2's positional convolution (weight_norm: W = g v / ||v||) is a conv site: exact to
    peft; merged (ungrouped, as peft merges) into v and g, which compute W + dW exactly. Merge is
    checked against the unmerged graph: peft 0.21's merge_and_unload adds dW to the weight the
    parametrization computes and then discards, 2.4 off on this model."""
    model, args, kwargs = _wav2vec2(groups)
    parity = against_peft(model, args, kwargs, config, tmp_path, merge=groups == 1)
    assert parity.output == 0.0 and parity.gradient <= 1e-6
