"""One matrix, technique x site kind x model, against HF peft as the oracle (in the spirit of peft's
own custom-model tests).

Each cell: peft builds the adapter on its copy of the model, gets random non-zero adapter weights
and saves them; peftc captures its copy, loads that checkpoint, and must give peft's outputs and
every adapter tensor's gradient; merging keeps the outputs; what peftc saves loads back into
`peft.PeftModel.from_pretrained` with equal outputs.
"""

from __future__ import annotations

import copy
import functools

import peft
import pytest
import torch
from torch import nn

import peftc
from peftc.tools.models import example_inputs, tiny_model
from conftest import fill_trainable


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1, self.lin2 = nn.Linear(10, 20), nn.Linear(20, 20), nn.Linear(20, 4)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class Conv2dModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.lin0 = nn.Linear(8 * 5 * 5, 4)

    def forward(self, x):
        return self.lin0(torch.relu(self.conv1(torch.relu(self.conv0(x)))).flatten(1))


class Conv1dModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0, self.lin0 = nn.Conv1d(4, 8, 3, stride=2), nn.Linear(8 * 4, 3)

    def forward(self, x):
        return self.lin0(torch.relu(self.conv0(x)).flatten(1))


class EmbModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin0 = nn.Embedding(50, 16), nn.Linear(16, 4)

    def forward(self, ids):
        return self.lin0(self.emb(ids))


class NormModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.norm, self.lin1 = nn.Linear(10, 16), nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.lin1(self.norm(self.lin0(x)))


class MHAModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha, self.lin0 = nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 4)

    def forward(self, x):
        return self.lin0(self.mha(x, x, x, need_weights=False)[0])


def _custom(cls, *shape, ids=False):
    def make():
        torch.manual_seed(0)
        model = cls().eval()
        generator = torch.Generator().manual_seed(1)
        x = torch.randint(0, 50, shape, generator=generator) if ids else torch.randn(*shape, generator=generator)
        return model, (x,), {}
    return make


def _hf(arch):
    def make():
        model = tiny_model(arch)
        args, kwargs = example_inputs(model, batch=3, seq=9, seed=2)
        return model, args, kwargs
    return make


MODELS = {
    "mlp": _custom(MLP, 4, 10),
    "conv2d": _custom(Conv2dModel, 2, 3, 5, 5),
    "conv1d": _custom(Conv1dModel, 2, 4, 9),
    "embedding": _custom(EmbModel, 3, 7, ids=True),
    "layernorm": _custom(NormModel, 4, 10),
    "mha": _custom(MHAModel, 2, 5, 16),
    "llama": _hf("llama"),
    "gpt2": _hf("gpt2"),
    "bert": _hf("bert"),
}

# technique -> {model: peft config}; a model missing from a row is one peft does not support for it.
MATRIX = {
    "lora": {
        "mlp": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"]),
        "conv2d": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["conv0", "conv1"]),
        "conv1d": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["conv0", "lin0"]),
        "embedding": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "lin0"]),
        "llama": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
        "gpt2": lambda: peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        "mha": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["mha"]),
        "bert": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.1),
    },
    "dora": {
        "mlp": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], use_dora=True),
        "conv1d": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["conv0"], use_dora=True),
        "llama": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"], use_dora=True),
        "gpt2": lambda: peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_proj"], fan_in_fan_out=True, use_dora=True),
    },
    "loha": {
        "mlp": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=["lin0", "lin1"]),
        "conv2d": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=["conv0", "conv1"]),
        "llama": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"]),
        "bert": lambda: peft.LoHaConfig(r=8, alpha=8, target_modules=["query", "intermediate.dense"]),
    },
    "lokr": {
        "mlp": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=["lin0", "lin1"]),
        "conv1d": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=["conv0"]),
        "llama": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"]),
        "bert": lambda: peft.LoKrConfig(r=16, alpha=4, target_modules=["query", "value"]),
    },
    "ia3": {
        "mlp": lambda: peft.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]),
        "conv2d": lambda: peft.IA3Config(target_modules=["conv0", "conv1"], feedforward_modules=["conv1"]),
        "llama": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "gpt2": lambda: peft.IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"], fan_in_fan_out=True),
        "bert": lambda: peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]),
    },
    "vera": {
        "mlp": lambda: peft.VeraConfig(r=4, target_modules=["lin0", "lin1"]),
        "llama": lambda: peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]),
    },
    "oft": {
        "mlp": lambda: peft.OFTConfig(oft_block_size=5, target_modules=["lin0", "lin1"]),
        "conv2d": lambda: peft.OFTConfig(oft_block_size=4, target_modules=["conv1"]),
        "llama": lambda: peft.OFTConfig(oft_block_size=16, target_modules=["q_proj", "v_proj"]),
    },
    "boft": {
        "mlp": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=["lin1"]),
        "llama": lambda: peft.BOFTConfig(boft_block_size=8, target_modules=["q_proj", "v_proj"]),
    },
    "hra": {
        "mlp": lambda: peft.HRAConfig(r=2, target_modules=["lin0", "lin1"]),
        "llama": lambda: peft.HRAConfig(r=4, target_modules=["q_proj", "v_proj"]),
    },
    "fourierft": {
        "mlp": lambda: peft.FourierFTConfig(n_frequency=40, target_modules=["lin0", "lin1"]),
        "llama": lambda: peft.FourierFTConfig(n_frequency=100, target_modules=["q_proj", "v_proj"]),
    },
    "adalora": {
        "mlp": lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["lin0", "lin1"]),
        "llama": lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"]),
    },
    "ln_tuning": {
        "layernorm": lambda: peft.LNTuningConfig(target_modules=["norm"]),
        "llama": lambda: peft.LNTuningConfig(target_modules=["input_layernorm", "norm"]),
        "gpt2": lambda: peft.LNTuningConfig(target_modules=["ln_1", "ln_f"]),
        "bert": lambda: peft.LNTuningConfig(target_modules=["LayerNorm"]),
    },
}

CELLS = [(t, m) for t, row in MATRIX.items() for m in row]


@functools.cache
def _capture_once(model_name):
    model, args, kwargs = MODELS[model_name]()
    return peftc.capture(model, args, kwargs)


def _captured(model_name, base, args, kwargs):
    """One capture per model (the models are rebuilt from the same seed, and loading never changes it)."""
    gm = _capture_once(model_name)
    assert all(torch.equal(p, base.get_parameter(n)) for n, p in gm.named_parameters()), "the base model changed"
    return gm


def _first(output):
    if isinstance(output, torch.Tensor):
        return output
    return output[0] if isinstance(output, (tuple, list)) else next(iter(output.values()))


def _call(model, args, kwargs, decoder=False):
    """The first output; eager decoders are told `use_cache=False` (capture already did that)."""
    return _first(model(*args, **({**kwargs, "use_cache": False} if decoder else kwargs)))


def _close(got, expected, what):
    # 1e-5 of the output scale: peft and peftc sum in different orders, which differs by CPU and BLAS path.
    scale = max(expected.detach().abs().max().item(), 1.0)
    torch.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=1e-5, msg=what)


@pytest.mark.parametrize("technique, model_name", CELLS, ids=[f"{t}-{m}" for t, m in CELLS])
def test_matrix(technique, model_name, tmp_path):
    model, args, kwargs = MODELS[model_name]()
    decoder = model_name in ("llama", "gpt2")
    base = copy.deepcopy(model)
    peft_model = peft.get_peft_model(model, MATRIX[technique][model_name]()).eval()
    fill_trainable(peft_model, seed=1)
    peft_model.save_pretrained(tmp_path / "peft")
    gm = peftc.load_adapter(_captured(model_name, base, args, kwargs), tmp_path / "peft").eval()

    expected, got = _call(peft_model, args, kwargs, decoder), _call(gm, args, kwargs)
    _close(got, expected, "outputs")
    without = _call(peftc.apply(gm, "disable_adapters"), args, kwargs)
    assert (without - got).abs().max() > 1e-4, "the adapter must change the output for the test to mean anything"

    expected.square().mean().backward()
    got.square().mean().backward()
    theirs = {n.removeprefix("base_model.model."): p for n, p in peft_model.named_parameters() if p.requires_grad}
    ours = {n: p for n, p in gm.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs) and ours
    for name, p in ours.items():
        assert p.grad is not None, name
        _close(p.grad, theirs[name].grad, f"gradient of {name}")

    with torch.no_grad():
        _close(_call(peftc.apply(gm, "merge"), args, kwargs), got, "merged outputs")
        peftc.save_adapter(gm, tmp_path / "ours")
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        _close(_call(reloaded, args, kwargs, decoder), got, "peftc's checkpoint loaded in peft")
