"""BOFT against HF peft 0.21: linear and 2-d convolution sites, tiny Llama, merging, checkpoints
both ways, the block dropout in training, refusals.

peft builds the butterfly (n_butterfly_factor > 1) only with its fbd CUDA extension and silently
uses one factor without it. peftc always builds the real butterfly, so it is compared with peft
where peft is exact: one factor natively, several with `FakeFbd` standing in for the CUDA kernel (a
block diagonal, which is all the kernel computes). peft's failed compile of the extension is
skipped.
"""

import peft
import peft.tuners.boft.layer as boft_layer
import pytest
import torch

import peftc
import peftc.techniques.boft
from peftc.errors import OptionError, PeftcError, TargetError
from peftc.tools.parity import against_peft, close

from conftest import captured
from zoo import adapted_paths, build, check


class FakeFbd:
    """peft's fbd CUDA kernel: (N, D, b, b) -> (N, D b, D b) block diagonals, and its backward."""

    @staticmethod
    def forward(x):
        return [torch.stack([torch.block_diag(*factor) for factor in x])]

    @staticmethod
    def backward(grad, x):
        b = x.shape[-1]
        return [
            torch.stack(
                [
                    torch.stack(
                        [g[d * b : (d + 1) * b, d * b : (d + 1) * b] for d in range(x.shape[1])]
                    )
                    for g in grad
                ]
            )
        ]


@pytest.fixture(autouse=True)
def no_cuda_compile(monkeypatch):
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 4, 2, padding=1)  # rotated dimension 2 * 2 * 2 = 8
        self.lin = torch.nn.Linear(16, 12)
        self.out = torch.nn.Linear(12, 5, bias=False)

    def forward(self, x, img):
        return self.out(torch.relu(self.lin(x))) + self.conv(img).mean((2, 3))[:, :1]


def small_inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(3, 16, generator=g), torch.randn(3, 2, 5, 5, generator=g)), {}


def small():
    return Small(), *small_inputs()


def boft(*targets, **fields):
    return peft.BOFTConfig(target_modules=list(targets), **fields)


FAR = {"scale": 0.3}  # rotations far from the identity
CELLS = {
    "mlp": ("mlp", boft("lin1", boft_block_size=4)),
    "llama": ("llama", boft("q_proj", "v_proj", boft_block_size=8)),
    "llama-down_proj": ("llama", boft("q_proj", "down_proj", boft_block_size=8)),
    "small-block-size": (small, boft("conv", "lin", "out", boft_block_size=4), FAR),
    "small-block-num": (
        small,
        boft("conv", "lin", "out", boft_block_num=2, boft_block_size=0),
        FAR,
    ),
    "small-butterfly-2": (
        small,
        boft("conv", "lin", "out", boft_block_size=2, boft_n_butterfly_factor=2),
        FAR,
    ),
    "small-butterfly-3": (
        small,
        boft("lin", boft_block_num=4, boft_block_size=0, boft_n_butterfly_factor=3),
        FAR,
    ),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path, monkeypatch):
    model, config, *options = CELLS[cell]
    if config.boft_n_butterfly_factor > 1:
        monkeypatch.setattr(boft_layer, "get_fbd_cuda", FakeFbd)
    options = dict(*options)
    parity = check(model, config, tmp_path, **options)
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.reloaded is not None
    assert (parity.merged is not None) == options.get("merge", True)


def test_nf4_matches_peft_on_bitsandbytes_linear4bit(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from bnb_oracle import linear4bit_model

    model, args, kwargs = build("llama")
    parity = against_peft(
        model,
        args,
        kwargs,
        boft("q_proj", "up_proj", boft_block_size=8),
        tmp_path,
        graph=peftc.apply(captured("tiny-llama"), "nf4, freeze"),
        prepare=lambda m: linear4bit_model(m, monkeypatch),
        merge=False,
    )
    qboft = parity.graph
    assert all(s.storage == "nf4" for s in peftc.linear_sites(qboft) if s.path != "lm_head")
    merged = peftc.apply(qboft, "merge(dtype='float32')")
    close(merged(*args, **kwargs).logits, qboft(*args, **kwargs).logits, "merged outputs")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_dropout_draws_what_peft_draws(seed, tmp_path):
    def seeded():  # Small() seeds the generator: reseed after it, so each seed draws other masks
        model = Small()
        torch.manual_seed(seed)
        return model, *small_inputs()

    config = boft("lin", "out", boft_block_size=2, boft_dropout=0.5)
    gm = check(
        seeded, config, tmp_path, scale=0.3, train=True
    ).graph  # both in training mode, the same masks
    args, _ = small_inputs()
    assert (
        gm.train()(*args) - gm.eval()(*args)
    ).abs().max() > 1e-3  # the dropout really replaced blocks


def test_refusals(tmp_path):
    args, _ = small_inputs()
    peft.get_peft_model(
        Small(), peft.BOFTConfig(target_modules=["lin"], bias="boft_only")
    ).save_pretrained(tmp_path)
    with pytest.raises(PeftcError, match="the config sets bias='boft_only'"):
        peftc.load_adapter(peftc.capture(Small(), args, method="symbolic"), tmp_path)
    gm = peftc.capture(Small(), args, method="symbolic")
    with pytest.raises(
        OptionError, match=r"'lin' \(rotated dimension 16\) is not divisible by block_size=5"
    ):
        peftc.apply(gm, "boft(block_size=5, targets='lin')")
    with pytest.raises(OptionError, match="block_size \\* 2\\^\\(n_butterfly_factor - 1\\) = 32"):
        peftc.apply(gm, "boft(block_size=8, n_butterfly_factor=3, targets='lin')")
    with pytest.raises(TargetError):
        peftc.apply(gm, "boft(targets='nothing_here')")
    grouped = peftc.capture(
        torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1, groups=2)),
        (torch.randn(1, 4, 3, 3),),
        method="symbolic",
    )
    with pytest.raises(
        OptionError, match="is a grouped convolution, which peft's BOFT does not support"
    ):
        peftc.apply(grouped, "boft(block_size=2, targets='0')")
