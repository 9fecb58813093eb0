"""Adapters over float16/bfloat16 models as peft builds them: with `autocast_adapter_dtype` (peft's
default) the adapter's tensors stay float32, the term is computed from x cast to float32 and the
sum cast back; without it, everything in the model's dtype. Outputs equal peft's exactly on a
bfloat16 Llama and Mixtral; gradients agree within bfloat16's precision (the same ops, summed in
another order); merging rounds into bfloat16 weights."""

import copy
import functools
from dataclasses import dataclass

import peft
import pytest
import torch

import peftc
from peftc.errors import OptionError
from peftc.technique import AdapterOptions, Param, Technique
from peftc.tools.models import example_inputs, tiny_model
from peftc.tools.parity import against_peft

from zoo import build

BF16 = 1e-2  # bfloat16 keeps 8 bits of mantissa
# elsewhere (LoHa, LoKr, HRA) float32 sums in another order may round one bfloat16 step apart
EXACT = ("lora", "dora", "ia3", "tokens", "vera", "fourierft", "ln_tuning", "oft", "boft")
GRADIENTS = 3e-2  # a few bfloat16 steps of the largest gradient: sums rounded in another order


@functools.cache
def bf16(arch):
    model = tiny_model(arch).to(torch.bfloat16)
    args, kwargs = example_inputs(model, batch=3, seq=9, seed=2)
    return model, args, kwargs, peftc.apply(peftc.capture(model, args, kwargs), "freeze")


def lora(*targets, **fields):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), **fields)


CELLS = {
    "lora": ("llama", lora("q_proj", "v_proj", "down_proj")),
    "lora-embedding": ("llama", lora("embed_tokens", "q_proj")),
    "dora": ("llama", lora("q_proj", "v_proj", use_dora=True)),
    "lora-tokens": ("llama", lora("q_proj", trainable_token_indices=[44, 145])),
    "lora-experts": (
        "mixtral",
        lora("q_proj", target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
    ),
    "loha": ("llama", peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "lokr": ("llama", peft.LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "vera": ("llama", peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"])),
    "fourierft": (
        "llama",
        peft.FourierFTConfig(n_frequency=20, target_modules=["q_proj", "v_proj"]),
    ),
    "ln_tuning": ("llama", peft.LNTuningConfig(target_modules=["input_layernorm"])),
    "hra": ("llama", peft.HRAConfig(r=4, target_modules=["q_proj", "v_proj"])),
    "oft": (
        "llama",
        peft.OFTConfig(r=0, oft_block_size=16, target_modules=["q_proj", "v_proj"], coft=True),
    ),
    "boft": ("llama", peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj", "v_proj"])),
    "ia3": (
        "llama",
        peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ),
    "tokens": ("llama", peft.TrainableTokensConfig(token_indices=[44, 145])),
}


# LoHa and LoKr in bfloat16 throughout: peft's custom backward rounds its products in another
# order, several bfloat16 steps apart on the largest gradients; peftc does not reproduce that order.
# BOFT: peft's Cayley transform solves in bfloat16 then, which has no CPU kernel.
MODEL_DTYPE = [c for c in CELLS if c not in ("loha", "lokr", "boft")]


def bf16_parity(arch, config, autocast, folder, **options):
    """`against_peft` on the bfloat16 `arch`, within bfloat16's tolerances."""
    model, args, kwargs, graph = bf16(arch)
    return against_peft(
        model,
        args,
        kwargs,
        config,
        folder,
        graph=graph,
        tol=BF16,
        grad_tol=GRADIENTS,
        autocast_adapter_dtype=autocast,
        **options,
    )


@pytest.mark.parametrize(
    "cell, autocast",
    [(c, True) for c in CELLS] + [(c, False) for c in MODEL_DTYPE],
    ids=[f"{c}-autocast" for c in CELLS] + [f"{c}-model-dtype" for c in MODEL_DTYPE],
)
def test_matches_peft_on_bfloat16(cell, autocast, tmp_path):
    arch, config = CELLS[cell]
    torch.manual_seed(0)  # peft draws the adapter from the global RNG
    # merged into bfloat16 experts, some draws (3 in 10) flip a router's top-k choice, which moves
    # outputs by ~0.3; test_target_parameters checks that merge in float32
    parity = bf16_parity(arch, config, autocast, tmp_path, merge=cell != "lora-experts")
    if cell.startswith(EXACT):  # the same ops in the same order as peft's, rounded once
        assert parity.output == 0.0 and parity.reloaded == 0.0
    dtypes = {p.dtype for n, p in parity.graph.named_parameters() if p.requires_grad} | {
        p.dtype for p in parity.peft.parameters() if p.requires_grad
    }
    assert dtypes == ({torch.float32} if autocast and cell != "ln_tuning" else {torch.bfloat16})


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "model-dtype"])
def test_adalora_matches_peft_on_bfloat16_but_keeps_ranknum_frozen(autocast, tmp_path):
    """Over a bfloat16 model peft re-wraps AdaLoRA's frozen `ranknum` (its rank, a constant) as a
    trainable parameter when it casts the adapter (to float32, or to the base's dtype), so an
    optimizer would move it there; peftc keeps it frozen and equals peft on everything else."""
    config = peft.AdaLoraConfig(target_modules=["q_proj", "v_proj"], total_step=10, init_r=4)
    parity = bf16_parity("llama", config, autocast, tmp_path, peft_wrongly_trains=("ranknum",))
    assert parity.output == 0.0 and parity.reloaded == 0.0
    theirs = {n for n, p in parity.peft.named_parameters() if p.requires_grad and "ranknum" in n}
    assert theirs, "peft trains ranknum over a bfloat16 model"
    assert not any(p.requires_grad for n, p in parity.graph.named_parameters() if "ranknum" in n)
    dtypes = {p.dtype for p in parity.graph.parameters() if p.requires_grad}
    assert dtypes == {torch.float32 if autocast else torch.bfloat16}


def test_boft_on_a_bfloat16_convolution_as_peft(tmp_path):
    """peft rotates a convolution's weight in bfloat16, scales it in float32 and convolves in
    float32; a linear's input is rotated in bfloat16 and its output scaled in float32."""
    model, args, kwargs = build("conv2d")
    model, args = model.to(torch.bfloat16), tuple(a.to(torch.bfloat16) for a in args)
    config = peft.BOFTConfig(boft_block_size=2, target_modules=["conv1", "lin0"])
    parity = against_peft(model, args, kwargs, config, tmp_path, tol=BF16, grad_tol=GRADIENTS)
    assert parity.output == 0.0 and parity.reloaded == 0.0


def test_a_technique_without_peft_s_mixed_precision_is_refused_by_name():
    """A technique that does not declare how peft computes it over a half-precision base."""

    @dataclass(frozen=True)
    class ShiftOptions(AdapterOptions):
        pass

    @peftc.register_technique(replace=True)
    class HalfShift(Technique):
        name, options, stage, peft_type = "test_half_shift", ShiftOptions, "add", None

        def params(self, ctx):
            return [Param("shift", (ctx.site.out_features,))]

        def build(self, b, x):
            return b.param("shift")

    graph = bf16("llama")[3]
    with pytest.raises(OptionError, match="pass autocast_adapter_dtype=false"):
        peftc.apply(graph, "test_half_shift(targets='*.q_proj')")
    adapted = peftc.apply(
        graph, "test_half_shift(targets='*.q_proj', autocast_adapter_dtype=false)"
    )
    assert {p.dtype for p in adapted.parameters() if p.requires_grad} == {torch.bfloat16}


def test_prompt_methods_keep_float32_prompts_as_peft():
    """peft's prompt encoders are float32 whatever the model's dtype (autocast_adapter_dtype does
    not apply to prompt learning), cast where the prompt joins a bfloat16 model."""
    model, args, kwargs, graph = bf16("llama")
    for text, config in (
        ("prompt(n=4)", peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
        ("prefix(n=4)", peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    ):
        adapted = peftc.apply(graph, text)
        theirs = peft.get_peft_model(copy.deepcopy(model), config)
        ours = {n: p.dtype for n, p in adapted.named_parameters() if p.requires_grad}
        assert ours == {n: p.dtype for n, p in theirs.named_parameters() if p.requires_grad}
        assert adapted(*args, **kwargs)[0].dtype == torch.bfloat16
