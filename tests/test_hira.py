"""HiRA against HF peft 0.21: linear, embedding and 1d/2d convolution sites, tiny Llama, dropout,
inits, merging, checkpoints both ways, several adapters on one site, and refusals."""

import peft
import pytest
import torch
from torch import nn

import peftc
import peftc.techniques.hira
from peftc.errors import OptionError, PeftcError
from peftc.tools.parity import close, perturb

from zoo import adapted_paths, check, graph, symbolic


class Small(nn.Module):
    """An embedding (with a padding row), a linear, a Conv1d and a strided, dilated Conv2d."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.lin = nn.Linear(8, 6)
        self.conv1 = nn.Conv1d(6, 5, 3)
        self.conv2 = nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2)

    def forward(self, ids, img):
        h = self.conv1(torch.relu(self.lin(self.emb(ids))).transpose(1, 2))
        return torch.cat([h.flatten(), self.conv2(img).flatten()])


def small():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 20, (3, 7), generator=g)
    ids[:, 0] = 0  # the padding row: peft's branch trains it all the same
    return Small().eval(), (ids, torch.randn(3, 2, 6, 6, generator=g)), {}


def hira(*targets, **fields):
    return peft.HiraConfig(target_modules=list(targets), **fields)


EVERY_KIND = ("emb", "lin", "conv1", "conv2")
CELLS = {
    "llama": ("llama", hira("q_proj", "down_proj", "embed_tokens", r=4)),
    "small": (small, hira(*EVERY_KIND, r=3)),
    "small-dropout": (small, hira(*EVERY_KIND, r=2, hira_dropout=0.3), {"train": True}),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config, *options = CELLS[cell]
    parity = check(model, config, tmp_path, **dict(*options))
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.merged is not None and parity.reloaded is not None
    print(
        f"hira {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


@pytest.mark.parametrize("init", [True, False, "gaussian", None])
def test_inits_are_peft_s(init, tmp_path):
    """Which factors start at zero, per layer kind, as peft's; the value round-trips its config."""
    model, args, _ = small()
    theirs = peft.get_peft_model(Small(), hira(*EVERY_KIND, r=2, init_weights=init))
    text = f"hira(r=2, targets='{'|'.join(EVERY_KIND)}', init_weights={init!r})"
    ours = peftc.apply(symbolic(*small()), text)
    for name, p in ours.named_parameters():
        if p.requires_grad:
            expected = theirs.base_model.model.get_parameter(name)
            assert bool(p.abs().sum() == 0) == bool(expected.abs().sum() == 0), name
    if init is True:
        torch.testing.assert_close(ours(*args), model(*args), atol=0, rtol=0)
    peftc.save_adapter(ours, tmp_path)
    assert peft.PeftConfig.from_pretrained(tmp_path).init_weights == init


def test_two_adapters_merge_from_the_weight_before_merging_and_switch():
    """y = W x + b + (W ⊙ B_x A_x) x + (W ⊙ B_y A_y) x; merged, W' = W + W ⊙ (B_x A_x + B_y A_y),
    as peft merges several adapters."""
    model, x = nn.Linear(8, 6), torch.randn(5, 8)
    pipeline = (
        "hira(r=2, adapter='x', targets='all-linear'), hira(r=3, adapter='y', targets='all-linear')"
    )
    gm = perturb(peftc.apply(symbolic(model, (x,)), pipeline), 0.3)
    W = model.weight.detach()
    branch = {
        name: W * (gm.get_parameter(f"hira_B.{name}") @ gm.get_parameter(f"hira_A.{name}"))
        for name in ("x", "y")
    }
    with torch.no_grad():
        close(gm(x), model(x) + x @ (branch["x"] + branch["y"]).T, "both adapters")
        merged = peftc.apply(gm, "merge")
        close(merged.get_parameter("weight"), W + branch["x"] + branch["y"], "merged weight")
        only_y = peftc.apply(peftc.apply(merged, "unmerge"), "set_adapter(name='y')")
        close(only_y(x), model(x) + x @ branch["y"].T, "adapter y alone")


def test_refuses_what_peft_does_not_do(tmp_path):
    peft.get_peft_model(Small(), hira("lin", rank_pattern={"lin": 2})).save_pretrained(tmp_path)
    with pytest.raises(PeftcError, match=r"the config sets rank_pattern=\{'lin': 2\}"):
        peftc.load_adapter(symbolic(*small()), tmp_path)
    grouped = symbolic(nn.Sequential(nn.Conv2d(2, 4, 3, groups=2)), (torch.randn(1, 2, 5, 5),))
    with pytest.raises(OptionError, match="is a grouped convolution"):
        peftc.apply(grouped, "hira(r=2, targets='0')")
    conv3d = symbolic(nn.Sequential(nn.Conv3d(2, 4, (1, 1, 3))), (torch.randn(1, 2, 4, 4, 4),))
    with pytest.raises(OptionError, match=r"a Conv3d with kernel \(1, 1, 3\)"):
        peftc.apply(conv3d, "hira(r=2, targets='0')")
    with pytest.raises(OptionError, match="a projection of an nn.MultiheadAttention"):
        peftc.apply(graph("mha"), "hira(r=2, targets='mha.out_proj')")
    with pytest.raises(OptionError, match="r must be a positive integer"):
        peftc.apply(symbolic(*small()), "hira(r=0, targets='lin')")
