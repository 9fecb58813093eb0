"""Trainable tokens (peft's TRAINABLE_TOKENS and LoRA's `trainable_token_indices`) against HF peft:
chosen rows of an embedding trained in place, GPT-2's tied LM head seeing them as peft ties it,
untied heads named apart; outputs, every gradient, merge and checkpoints both ways."""

import peft
import pytest

import peftc
from peftc.errors import OptionError

from zoo import check, graph


def tokens(**fields):
    return peft.TrainableTokensConfig(**{"init_weights": False, **fields})


def lora(*targets, **fields):
    return peft.LoraConfig(
        **{"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": list(targets)},
        **fields,
    )


CELLS = {
    "embedding": ("embedding", tokens(target_modules=["emb"], token_indices=[0, 10])),
    "gpt2-tied": ("gpt2", tokens(token_indices=[1, 5, 17])),
    "llama": ("llama", tokens(token_indices=[44, 145, 200])),
    "lora-embedding": ("embedding", lora("lin0", trainable_token_indices={"emb": [0, 10]})),
    "lora-gpt2-tied": (
        "gpt2",
        lora("c_attn", fan_in_fan_out=True, trainable_token_indices=[1, 5]),
    ),
    "lora-llama-untied-head": (
        "llama",
        lora("q_proj", trainable_token_indices={"embed_tokens": [44, 7], "lm_head": [3, 9]}),
    ),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config = CELLS[cell]
    parity = check(model, config, tmp_path)
    assert parity.merged is not None and parity.reloaded is not None


def test_tied_checkpoint_holds_the_delta_under_both_modules_as_peft(tmp_path):
    gm = peftc.apply(graph("gpt2"), "trainable_tokens(token_indices=[1, 5])")
    peftc.save_adapter(gm, tmp_path)
    from safetensors.torch import load_file

    # peft writes the delta under the embedding and again under the head tied to it
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {
        "base_model.model.transformer.wte.trainable_tokens_delta",
        "base_model.model.lm_head.trainable_tokens_delta",
    }


def test_refusals_name_the_problem():
    with pytest.raises(OptionError, match="token id 999 is past the 256 rows"):
        peftc.apply(graph("llama"), "trainable_tokens(token_indices=[1, 999])")
    with pytest.raises(OptionError, match="distinct token ids"):
        peftc.apply(graph("llama"), "trainable_tokens(token_indices=[1, 1])")
    with pytest.raises(OptionError, match="distinct and not negative"):
        peftc.apply(graph("llama"), "lora(targets='*.q_proj', trainable_token_indices=[3, -1])")
    with pytest.raises(OptionError, match="both a target and holds trainable tokens"):
        peftc.apply(
            graph("llama"),
            "lora(targets='none', target_parameters=['embed_tokens.weight'], "
            "trainable_token_indices=[1])",
        )
