"""OFT against HF peft 0.21: linear, 2-d convolution and embedding sites on a small model, tiny
Llama, NF4 against bitsandbytes' Linear4bit, merging, checkpoints both ways, refusals, composition
with LoRA."""

import warnings

import peft
import pytest
import torch
from transformers.pytorch_utils import Conv1D

import peftc
import peftc.techniques.oft
from peftc.errors import OptionError, PeftcError, TargetError
from peftc.tools.parity import against_peft, close, perturb

from conftest import captured
from zoo import adapted_paths, build, check

warnings.filterwarnings("ignore", message=".*Adjusted.*")


class Small(torch.nn.Module):
    """An embedding, a 3x3 and a 1x1 convolution and two linears (16 and 12 wide)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(10, 16)
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.pointwise = torch.nn.Conv2d(4, 8, 1)
        self.lin = torch.nn.Linear(16, 12)
        self.out = torch.nn.Linear(12, 5)

    def forward(self, ids, img):
        pooled = self.pointwise(self.conv(img)).mean((2, 3))
        return self.out(torch.relu(self.lin(self.emb(ids)))).sum(1) + pooled[:, :5]


def small_inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randint(0, 10, (3, 7), generator=g), torch.randn(3, 2, 6, 6, generator=g)), {}


def small():
    return Small(), *small_inputs()


def oft(*targets, **fields):
    return peft.OFTConfig(target_modules=list(targets), **fields)


SMALL = ("emb", "conv", "pointwise", "lin", "out")
# rotations far from the identity; Small's 3x3 convolution rotates input patches, which merging
# refuses
ON_SMALL = {"scale": 0.3, "merge": False}
CELLS = {
    "mlp": ("mlp", oft("lin0", "lin1", oft_block_size=5)),
    "conv2d": ("conv2d", oft("conv1", oft_block_size=4)),
    "llama": ("llama", oft("q_proj", "v_proj", oft_block_size=16)),
    "llama-layers": (
        "llama",
        oft("q_proj", oft_block_size=16, layers_to_transform=1, layers_pattern="layers"),
    ),
    "llama-down_proj-embedding": (
        "llama",
        oft("q_proj", "v_proj", "down_proj", "embed_tokens", oft_block_size=16, r=0),
    ),
    "small-block-size": (small, oft(*SMALL, oft_block_size=4, r=0), ON_SMALL),
    # 16 -> 4, 18 -> 6, 36 -> 6
    "small-adjusted-shared": (
        small,
        oft(*SMALL, oft_block_size=5, r=0, block_share=True),
        ON_SMALL,
    ),
    "small-r-exact-cayley": (
        small,
        oft(*SMALL, r=2, oft_block_size=0, use_cayley_neumann=False),
        ON_SMALL,
    ),
    "mlp-coft": ("mlp", oft("lin0", r=2, oft_block_size=0, coft=True, eps=0.01)),
    "small-coft-shared": (
        small,
        oft(*SMALL, r=0, oft_block_size=2, coft=True, eps=0.01, block_share=True),
        ON_SMALL,
    ),
    "small-neumann-7": (
        small,
        oft(*SMALL, oft_block_size=4, r=0, num_cayley_neumann_terms=7),
        ON_SMALL,
    ),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config, *options = CELLS[cell]
    options = dict(*options)
    parity = check(model, config, tmp_path, **options)
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.reloaded is not None
    assert (parity.merged is not None) == options.get("merge", True)


def test_merge_folds_the_rotation_and_refuses_patch_rotations(tmp_path):
    args, kwargs = small_inputs()
    gm = perturb(
        peftc.apply(
            peftc.capture(Small(), args, method="symbolic"),
            "freeze, oft(block_size=4, targets='emb|pointwise|lin|out')",
        ),
        0.3,
    )
    unmerged = gm(*args)
    merged = peftc.apply(gm, "merge")
    close(merged(*args), unmerged, "merged outputs")
    restored = peftc.apply(merged, "unmerge")
    close(restored(*args), unmerged, "unmerged outputs")
    assert all(
        torch.equal(restored.get_parameter(n), p)
        for n, p in gm.named_parameters()
        if not p.requires_grad
    )
    conv = perturb(
        peftc.apply(
            peftc.capture(Small(), args, method="symbolic"),
            "freeze, oft(block_size=6, targets='conv')",
        ),
        0.3,
    )
    with pytest.raises(
        PeftcError, match=r"'conv' has a \(3, 3\) kernel: peft's OFT rotates input patches"
    ):
        peftc.apply(conv, "merge")


class OnePatch(torch.nn.Module):
    """A 3x3 convolution over 3x3 images (peft's custom-model matrix has it): one patch each."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(5, 10, 3)

    def forward(self, img):
        return self.conv(img).flatten(1)


def test_merges_where_the_convolution_sees_one_patch(tmp_path):
    """Over 3x3 inputs the rotated patch folds back as it was: peft's merge is exact there, and
    peftc merges it where the graph shows that size (Small's 6x6 inputs are refused above)."""
    img = torch.randn(4, 5, 3, 3, generator=torch.Generator().manual_seed(1))
    config = oft("conv", r=5, oft_block_size=0)
    parity = check(lambda: (OnePatch(), (img,), {}), config, tmp_path, scale=0.3)
    assert parity.merged is not None


def test_nf4_matches_peft_on_bitsandbytes_linear4bit(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from bnb_oracle import linear4bit_model

    model, args, kwargs = build("llama")
    parity = against_peft(
        model,
        args,
        kwargs,
        oft("q_proj", "up_proj", oft_block_size=8, r=0),
        tmp_path,
        graph=peftc.apply(captured("tiny-llama"), "nf4, freeze"),
        prepare=lambda m: linear4bit_model(m, monkeypatch),
        merge=False,
    )
    qoft = parity.graph
    assert all(s.storage == "nf4" for s in peftc.linear_sites(qoft) if s.path != "lm_head")
    merged = peftc.apply(qoft, "merge(dtype='float32')")
    close(merged(*args, **kwargs).logits, qoft(*args, **kwargs).logits, "merged outputs")


def test_oft_and_lora_on_one_site_compose_in_either_order():
    """OFT rotates the input (`input` stage), LoRA adds beside it from the unrotated x: y = W (x R)
    + b + s B A x."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4))
    x = torch.randn(5, 8)
    oft, lora = (
        "oft(block_size=4, adapter='o', targets='all-linear')",
        "lora(r=2, adapter='l', targets='all-linear')",
    )
    first = perturb(
        peftc.apply(peftc.capture(model, (x,), method="symbolic"), f"freeze, {oft}, {lora}"), 0.3
    )
    second = peftc.apply(peftc.capture(model, (x,), method="symbolic"), f"freeze, {lora}, {oft}")
    second.load_state_dict(first.state_dict())
    torch.testing.assert_close(second(x), first(x), atol=0, rtol=0)
    single = torch.nn.Linear(8, 6)
    gm = perturb(
        peftc.apply(peftc.capture(single, (x,), method="symbolic"), f"freeze, {oft}, {lora}"), 0.3
    )
    rotated = peftc.apply(gm, "set_adapter(name='o')")(x)
    added = peftc.apply(gm, "set_adapter(name='l')")(x) - single(x)
    torch.testing.assert_close(gm(x), rotated + added, atol=1e-6, rtol=1e-5)


def test_refusals(tmp_path):
    args, kwargs = small_inputs()
    gm = peftc.capture(Small(), args, method="symbolic")
    with pytest.raises(OptionError, match="give exactly one of r"):
        peftc.apply(gm, "oft(r=2, block_size=4, targets='lin')")
    with pytest.raises(TargetError):
        peftc.apply(gm, "oft(targets='nothing_here')")
    gpt2_style = peftc.capture(
        torch.nn.Sequential(Conv1D(8, 4)), (torch.randn(2, 4),), method="symbolic"
    )
    with pytest.raises(
        OptionError, match="'0' is a GPT-2 Conv1D, which peft's OFT does not support"
    ):
        peftc.apply(gpt2_style, "oft(block_size=2, targets='0')")


def test_coft_projects_the_stored_weights_as_peft(tmp_path):
    # every forward pass writes the projection into the parameter, outside autograd
    config = oft("lin0", r=2, oft_block_size=0, coft=True, eps=0.01)
    parity = check("mlp", config, tmp_path, train=True, scale=0.5)
    ours = parity.graph.get_parameter("lin0.oft_R.default.weight")
    theirs = parity.peft.base_model.model.lin0.oft_R["default"].weight
    torch.testing.assert_close(ours, theirs)
    bound = 0.01 / 2**0.5  # eps / sqrt(blocks), over the skew matrix's norm sqrt(2) |row|
    assert torch.all(torch.linalg.vector_norm(ours, dim=1) * 2**0.5 <= bound * (1 + 1e-5))
