"""BOFT against HF peft 0.21: linear and 2-d convolution sites, tiny Llama, merging, checkpoints both
ways, the block dropout in training, refusals.

peft builds the butterfly (n_butterfly_factor > 1) only with its fbd CUDA extension and silently uses
one factor without it. peftc always builds the real butterfly, so it is compared with peft where peft
is exact: one factor natively, several with `FakeFbd` standing in for the CUDA kernel (a block
diagonal, which is all the kernel computes). peft's failed compile of the extension is skipped.
"""

import copy

import peft
import peft.tuners.boft.layer as boft_layer
import pytest
import torch

import peftc
import peftc.techniques.boft  # noqa: F401  (registers the pass)
from peftc.errors import OptionError, PeftcError, TargetError
from conftest import captured, loaded
from rotation_parity import check_merge, check_parity, check_reload_in_peft, close, pair


class FakeFbd:
    """peft's fbd CUDA kernel: (N, D, b, b) -> (N, D b, D b) block diagonals, and its backward."""

    @staticmethod
    def forward(x):
        return [torch.stack([torch.block_diag(*factor) for factor in x])]

    @staticmethod
    def backward(grad, x):
        b = x.shape[-1]
        return [torch.stack([torch.stack([g[d * b:(d + 1) * b, d * b:(d + 1) * b] for d in range(x.shape[1])])
                             for g in grad])]


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


CONFIGS = {
    "block-size": (False, dict(boft_block_size=4)),
    "block-num": (False, dict(boft_block_num=2, boft_block_size=0)),
    "butterfly-2": (True, dict(boft_block_size=2, boft_n_butterfly_factor=2)),
    "butterfly-3": (True, dict(boft_block_num=4, boft_block_size=0, boft_n_butterfly_factor=3)),
}


@pytest.mark.parametrize("case", CONFIGS)
def test_small_model_matches_peft(case, tmp_path, monkeypatch):
    with_kernel, fields = CONFIGS[case]
    if with_kernel:
        monkeypatch.setattr(boft_layer, "get_fbd_cuda", FakeFbd)
    args, kwargs = small_inputs()
    targets = ["lin"] if fields.get("boft_n_butterfly_factor") == 3 else ["conv", "lin", "out"]
    peft_model, gm = pair(Small(), args, kwargs, peft.BOFTConfig(target_modules=targets, **fields), tmp_path)
    check_parity(peft_model, gm, args, kwargs)
    check_merge(gm, args, kwargs)
    check_reload_in_peft(gm, Small(), args, kwargs, tmp_path)


def test_tiny_llama_matches_peft_both_ways(tmp_path):
    lm = loaded("tiny-llama")
    config = peft.BOFTConfig(boft_block_size=8, target_modules=["q_proj", "down_proj"])
    graph = peftc.apply(captured("tiny-llama"), "freeze")
    peft_model, gm = pair(copy.deepcopy(lm.model), lm.args, lm.kwargs, config, tmp_path, scale=0.05, graph=graph)
    check_parity(peft_model, gm, lm.args, lm.kwargs, {"use_cache": False})
    check_merge(gm, lm.args, lm.kwargs)
    check_reload_in_peft(gm, copy.deepcopy(lm.model), lm.args, lm.kwargs, tmp_path, {"use_cache": False})


def test_nf4_matches_peft_on_bitsandbytes_linear4bit(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from bnb_oracle import linear4bit_model

    lm = loaded("tiny-llama")
    config = peft.BOFTConfig(boft_block_size=8, target_modules=["q_proj", "up_proj"])
    graph = peftc.apply(captured("tiny-llama"), "nf4, freeze")
    peft_model, qboft = pair(linear4bit_model(copy.deepcopy(lm.model), monkeypatch), lm.args, lm.kwargs, config, tmp_path,
                             scale=0.05, graph=graph)
    assert all(s.storage == "nf4" for s in peftc.linear_sites(qboft) if s.path != "lm_head")
    check_parity(peft_model, qboft, lm.args, lm.kwargs, {"use_cache": False})
    merged = peftc.apply(qboft, "merge(dtype='float32')")
    close(merged(*lm.args, **lm.kwargs).logits, qboft(*lm.args, **lm.kwargs).logits)


def test_block_dropout_draws_what_peft_draws(tmp_path):
    args, kwargs = small_inputs()
    config = peft.BOFTConfig(boft_block_size=2, boft_dropout=0.5, target_modules=["lin", "out"])
    peft_model, gm = pair(Small(), args, kwargs, config, tmp_path)
    peft_model.train()
    gm.train()
    dropped = []
    for seed in range(3):
        torch.manual_seed(seed)
        dropped.append(peft_model(*args))
        torch.manual_seed(seed)
        close(gm(*args), dropped[-1])
    peft_model.eval()
    gm.eval()
    close(gm(*args), peft_model(*args))
    assert (dropped[0] - gm(*args)).abs().max() > 1e-3  # the dropout really replaced blocks


def test_refusals(tmp_path):
    args, _ = small_inputs()
    peft.get_peft_model(Small(), peft.BOFTConfig(target_modules=["lin"], bias="boft_only")).save_pretrained(tmp_path)
    with pytest.raises(PeftcError, match="the config sets bias='boft_only'"):
        peftc.load_adapter(peftc.capture(Small(), args, method="symbolic"), tmp_path)
    gm = peftc.capture(Small(), args, method="symbolic")
    with pytest.raises(OptionError, match=r"'lin' \(rotated dimension 16\) is not divisible by block_size=5"):
        peftc.apply(gm, "boft(block_size=5, targets='lin')")
    with pytest.raises(OptionError, match="block_size \\* 2\\^\\(n_butterfly_factor - 1\\) = 32"):
        peftc.apply(gm, "boft(block_size=8, n_butterfly_factor=3, targets='lin')")
    with pytest.raises(TargetError):
        peftc.apply(gm, "boft(targets='nothing_here')")
    grouped = peftc.capture(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1, groups=2)), (torch.randn(1, 4, 3, 3),),
                            method="symbolic")
    with pytest.raises(OptionError, match="is a grouped convolution, which peft's BOFT does not support"):
        peftc.apply(grouped, "boft(block_size=2, targets='0')")
