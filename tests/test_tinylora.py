"""TinyLoRA against HF peft 0.21: SVD factors, seeded projections, shared vectors (weight tying),
linear and embedding sites, outputs, gradients, merge, checkpoints both ways (with and without the
projections), refusals."""

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftc
import peftc.techniques.tinylora
from peftc.errors import CheckpointError, OptionError, TargetError

from zoo import adapted_paths, build, check, graph


class Small(torch.nn.Module):
    """An embedding and two linears; `late` registered before `early`, called after it: peft's layer
    indices follow the modules' order."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(20, 12)
        self.late = torch.nn.Linear(8, 5)
        self.early = torch.nn.Linear(12, 8, bias=False)

    def forward(self, ids):
        return self.late(torch.tanh(self.early(self.emb(ids))))


def small(dtype=torch.float32):
    ids = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(3))
    return Small().to(dtype), (ids,), {}


def small_bf16():
    return small(torch.bfloat16)


def tinylora(*targets, **fields):
    return peft.TinyLoraConfig(target_modules=list(targets), **{"u": 5, **fields})


SMALL = ("emb", "early", "late")
LLAMA = ("q_proj", "v_proj", "down_proj")
CELLS = {
    "small": (small, tinylora(*SMALL, r=3, projection_seed=7)),
    "small-dropout": (small, tinylora(*SMALL, tinylora_dropout=0.2), {"train": True}),
    "small-tied-regenerated": (small, tinylora(*SMALL, weight_tying=0.5, save_projection=False)),
    "small-bf16-no-autocast": (
        small_bf16,
        tinylora(*SMALL, init_weights="uniform"),
        {"tol": 1e-2, "autocast_adapter_dtype": False},
    ),
    "llama": ("llama", tinylora(*LLAMA, u=16, weight_tying=0.4)),
    "gpt2": ("gpt2", tinylora("c_attn", "c_proj", r=4, weight_tying=1.0)),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config, *options = CELLS[cell]
    parity = check(model, config, tmp_path, **dict(*options))
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s
    files = [load_file(tmp_path / side / "adapter_model.safetensors") for side in ("peft", "peftc")]
    assert {k: v.dtype for k, v in files[0].items()} == {k: v.dtype for k, v in files[1].items()}
    assert any(".tinylora_P" in k for k in files[1]) == config.save_projection
    for path in peft_s:  # the projections are peft's, regenerated or not
        theirs = parity.peft.base_model.model.get_submodule(path).tinylora_P["default"]
        assert torch.equal(parity.graph.get_buffer(f"{path}.tinylora_P.default"), theirs)
    print(
        f"tinylora {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_factors_are_peft_s_and_v_starts_at_zero():
    gm = peftc.apply(graph("embedding"), "tinylora(u=4, weight_tying=1.0, targets='emb|lin0')")
    assert [n for n, p in gm.named_parameters() if p.requires_grad] == ["emb.tinylora_v.default.0"]
    module, (ids,), _ = build("embedding")
    layer = peft.get_peft_model(module, tinylora("emb", "lin0")).base_model.model.emb
    for attr in ("tinylora_A", "tinylora_B"):
        assert torch.equal(gm.get_buffer(f"emb.{attr}.default"), getattr(layer, attr)["default"])
    torch.testing.assert_close(gm(ids), graph("embedding")(ids), rtol=0, atol=0)


def test_refusals(tmp_path):
    with pytest.raises(CheckpointError, match="bias='tinylora_only'"):
        check(small, tinylora("early", bias="tinylora_only"), tmp_path)
    with pytest.raises(OptionError, match="weight_tying"):
        peftc.apply(graph("mlp"), "tinylora(targets='lin0', weight_tying=1.5)")
    module, args, _ = small_bf16()
    with pytest.raises(OptionError, match="autocast_adapter_dtype=false"):
        peftc.apply(peftc.capture(module, args), "tinylora(targets='early')")
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    gm = peftc.apply(peftc.capture(mha, (x, x, x)), "freeze")
    with pytest.raises(OptionError, match="not the nn.MultiheadAttention"):
        peftc.apply(gm, "tinylora(targets='out_proj')")
    with pytest.raises(TargetError, match="matches no linear"):
        peftc.apply(graph("conv2d"), "tinylora(targets='conv0')")
