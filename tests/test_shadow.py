"""ShadowPEFT against peft's SHADOW on a tiny Llama (GQA): outputs and every gradient, dropout in
training mode, checkpoints both ways, two adapters, refusals.

peft keeps the shadow backbone on its tuner (`base_model.shadow_backbone.default.*`), outside
`base_model.model.`, so `against_peft`'s comparison by name is written out here with `close`.
"""

import copy
import json

import peft
import pytest
import torch

import peftc
import peftc.techniques.shadow  # registers it
from peftc.errors import CheckpointError, OptionError
from peftc.technique.adapters import adapters, set_active
from peftc.tools.parity import close

from zoo import build, graph

TOP = ("shadow_backbone.", "shadow_projection.")  # on peft's tuner, not in its model


def inputs():
    model, args, kwargs = build("llama")
    kwargs["attention_mask"][0, -3:] = 0  # padding reaches the shadow backbone too
    return model, args, kwargs


def shadow_params(model, scale=0.1, seed=1):
    """Move every shadow tensor (inactive adapters' too: peft freezes those) off its init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "shadow_" in name:
                p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model


def peft_name(ours):
    return ("base_model." if ours.startswith(TOP) else "base_model.model.") + ours


def run(module, args, kwargs, state):
    """The logits from one RNG state (the same dropout masks on both sides), and their backward
    under fixed weights."""
    torch.set_rng_state(state)
    out = module(*args, **kwargs)[0]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * weights).sum().backward()
    return out


def gradients(ours, theirs):
    """The largest gradient difference over every trainable tensor, by peft's name."""
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    peft_s = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert {peft_name(n) for n in mine} == set(peft_s)
    worst, compared = 0.0, 0
    for name, p in mine.items():
        expected = peft_s[peft_name(name)].grad
        if expected is None:  # the last block's update is never read, in peft either
            assert p.grad is None, name
            continue
        worst = max(worst, close(p.grad, expected, f"gradient of {name}"))
        compared += 1
    assert compared > len(mine) // 2
    return worst


CONFIGS = {
    # the default mirror: one layer at the model's width on its token embeddings; dropout drawn
    "mirror-train": (dict(r=4, shadow_dropout=0.1, update_hidden_size=6), True),
    # a narrower two-layer mirror with its own embeddings and a projection, one block adapted,
    # and a trained copy of the head
    "narrow-eval": (
        dict(
            r=2,
            shadow_alpha=0.5,
            shadow_num_hidden_layers=2,
            shadow_hidden_size=32,
            shadow_num_attention_heads=2,
            shadow_intermediate_size=48,
            exclude_modules=["model.layers.0"],
            modules_to_save=["lm_head"],
        ),
        False,
    ),
}


@pytest.mark.parametrize("cell", CONFIGS)
def test_matches_peft(cell, tmp_path):
    fields, train = CONFIGS[cell]
    model, args, kwargs = inputs()
    config = peft.ShadowConfig(task_type="CAUSAL_LM", **fields)
    theirs = shadow_params(peft.get_peft_model(copy.deepcopy(model), config))
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftc.load_adapter(graph("llama"), tmp_path / "peft").train(train)
    theirs.train(train)
    state = torch.get_rng_state()
    expected = run(theirs, args, {**kwargs, "use_cache": False}, state)
    got = run(ours, args, kwargs, state)
    output = close(got, expected, "outputs")
    with torch.no_grad():
        assert (got - model(*args, **kwargs)[0]).abs().max() > 1e-3  # the shadow moves it
    gradient = gradients(ours, theirs)
    ours.eval()
    with torch.no_grad():
        evaluated = ours(*args, **kwargs)[0]
        if train:  # dropout follows the graph's mode
            assert (evaluated - got).abs().max() > 1e-4
        merged = peftc.apply(ours, "merge")  # left as it is: peft cannot merge it either
        assert not adapters(merged)["default"].merged
        torch.testing.assert_close(merged(*args, **kwargs)[0], evaluated, atol=0, rtol=0)
    peftc.save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        reloaded = close(again(*args, **kwargs, use_cache=False)[0], evaluated, "peft reloaded")
    print(f"shadow {cell}: output {output:.2g}, gradients {gradient:.2g}, reloaded {reloaded:.2g}")


def test_starts_as_the_base_and_switches_adapters_as_peft(tmp_path):
    model, args, kwargs = inputs()
    base = graph("llama")
    torch.manual_seed(5)
    fresh = peftc.apply(base, "shadow(r=4, shadow_num_hidden_layers=2)").eval()
    torch.manual_seed(5)  # the same draws in the same order: peft's init
    twin = peft.get_peft_model(
        copy.deepcopy(model), peft.ShadowConfig(r=4, shadow_num_hidden_layers=2)
    )
    for name, p in fresh.named_parameters():
        if "shadow_" in name:
            assert torch.equal(p, twin.get_parameter(peft_name(name))), name
    with torch.no_grad():
        torch.testing.assert_close(fresh(*args, **kwargs)[0], base(*args, **kwargs)[0])
        peftc.save_adapter(shadow_params(fresh), tmp_path / "native")
        again = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "native").eval()
        expected = again(*args, **kwargs, use_cache=False)[0]
        close(fresh(*args, **kwargs)[0], expected, "peft on peftc's own adapter")
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.ShadowConfig(r=4))
    theirs.add_adapter("b", peft.ShadowConfig(r=2, shadow_dropout=0.0, share_embeddings=False))
    shadow_params(theirs, scale=0.3).eval().save_pretrained(tmp_path / "peft")
    ours = peftc.load_adapter(base, tmp_path / "peft")
    disabled = peftc.apply(ours, "disable_adapters")
    ours = peftc.load_adapter(disabled, tmp_path / "peft" / "b", adapter="b")
    with torch.no_grad():
        for name in ("b", "default", "b"):
            theirs.set_adapter(name)
            ours = peftc.apply(ours, f"set_adapter(name='{name}')").eval()
            expected = theirs(*args, **kwargs, use_cache=False)[0]
            close(ours(*args, **kwargs)[0], expected, f"adapter {name}")
    with pytest.raises(OptionError, match="active together"):  # one at a time, as peft
        set_active(ours, ["b", "default"])
    gone = peftc.apply(ours, "delete_adapter(name='b'), delete_adapter(name='default')")
    assert not [n for n, _ in gone.named_parameters() if "shadow_" in n]
    assert len(gone.graph.nodes) == len(base.graph.nodes)
    peftc.save_adapter(ours, tmp_path / "ours-b", adapter="b")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours-b").eval()
    with torch.no_grad():
        expected = again(*args, **kwargs, use_cache=False)[0]
        close(ours(*args, **kwargs)[0], expected, "peft on peftc's 'b'")


@pytest.mark.parametrize(
    "text, match",
    [
        ("shadow(shadow_model='org/shadow-0.6B')", 'shadow_model must be "mirror"'),
        ("shadow(layers_to_transform=[1])", "layers_to_transform is not implemented"),
        ("shadow(task_type='SEQ_CLS')", "SEQ_CLS .* shadow_head"),
        ("shadow(targets='model.layers.0', exclude_modules=['model.layers.0'])", "no decoder"),
    ],
)
def test_refused_by_name(text, match):
    with pytest.raises(OptionError, match=match):
        peftc.apply(graph("llama"), text)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Decoder(torch.nn.Module):
    """Token embeddings and three blocks; `transformer_blocks` instead of `layers` makes it look
    like a Diffusers transformer."""

    def __init__(self, blocks="layers"):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        setattr(self, blocks, torch.nn.ModuleList(Block() for _ in range(3)))
        self.blocks = blocks

    def forward(self, ids):
        h = self.embed(ids)
        for block in getattr(self, self.blocks):
            h = block(h)
        return h


@pytest.mark.parametrize(
    "blocks, text, match",
    [
        ("layers", "shadow(targets='layers.0|layers.2')", "not contiguous"),
        ("transformer_blocks", "shadow", "diffusion transformers"),
    ],
)
def test_blocks_refused_by_name(blocks, text, match):
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    gm = peftc.capture(Decoder(blocks), (ids,), method="symbolic")
    with pytest.raises(OptionError, match=match):
        peftc.apply(gm, text)


def test_auxiliary_loss_and_foreign_checkpoints_refused(tmp_path):
    model, args, kwargs = inputs()
    labelled = peftc.capture(model, args, {**kwargs, "labels": args[0]})
    with pytest.raises(OptionError, match="auxiliary_loss_weight=0.05 adds peft's shadow loss"):
        peftc.apply(labelled, "shadow(r=2)")
    peftc.apply(labelled, "shadow(r=2, auxiliary_loss_weight=0)")  # nothing peft adds then
    peft.get_peft_model(model, peft.ShadowConfig(r=2)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "shadow_model": "org/x"}))
    with pytest.raises(CheckpointError, match="shadow_model"):
        peftc.load_adapter(graph("llama"), tmp_path)
