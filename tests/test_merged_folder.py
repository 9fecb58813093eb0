"""A finetuned graph as a transformers folder (`peftc.save_merged`, `peftc export --transformers`):
what `AutoModel*.from_pretrained` loads computes what peft's `merge_and_unload` computes."""

import copy
import json

import peft
import pytest
import torch
import transformers

import peftc
from peftc.errors import CheckpointError
from peftc.tools.cli import main
from peftc.tools.models import example_inputs, load_model, save_tiny_chat_model
from peftc.tools.parity import close, perturb

from bnb_oracle import F, bnb, dequantize, needs_bnb


def peft_merged(model, config, folder):
    """peft's adapter (perturbed, saved to `folder`) and its merge_and_unload'ed model."""
    theirs = perturb(peft.get_peft_model(copy.deepcopy(model), config), 0.3).eval()
    theirs.save_pretrained(folder)
    return theirs.merge_and_unload()


def test_a_merged_folder_loads_in_transformers_as_peft_s_merge(tmp_path):
    loaded = load_model("tiny-llama")
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"])
    expected_model = peft_merged(loaded.model, config, tmp_path / "adapter")
    gm = peftc.load_adapter(
        peftc.capture(loaded.model, loaded.args, loaded.kwargs), tmp_path / "adapter"
    )
    peftc.save_merged(gm, tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    args, kwargs = example_inputs(loaded.model, batch=3, seq=11, seed=5)
    with torch.no_grad():
        close(reloaded(*args, **kwargs).logits, expected_model(*args, **kwargs).logits, "merged")


def test_an_nf4_base_is_written_dense_and_the_cli_writes_the_tokenizer(tmp_path):
    folder = save_tiny_chat_model(tmp_path / "chat")
    loaded = load_model(str(folder))
    gm = peftc.capture(loaded.model, loaded.args, loaded.kwargs)
    trained = perturb(peftc.apply(gm, "nf4, freeze, lora(targets=['c_attn'])"), 0.3)
    peftc.save_adapter(trained, tmp_path / "adapter")
    steps = f"nf4, load_adapter(path='{tmp_path / 'adapter'}')"
    assert (
        main(["export", str(folder), "--passes", steps, "--transformers", str(tmp_path / "out")])
        == 0
    )
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").vocab_size > 0
    with torch.no_grad():
        close(
            reloaded(*loaded.args, **loaded.kwargs).logits,
            trained.eval()(*loaded.args, **loaded.kwargs).logits,
            "dense",
        )


def test_what_a_folder_cannot_hold_is_refused(tmp_path):
    loaded = load_model("tiny-llama")
    gm = peftc.capture(loaded.model, loaded.args, loaded.kwargs)
    with pytest.raises(CheckpointError, match="does not merge into the weights"):
        peftc.save_merged(peftc.apply(gm, "prompt(n=4)"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    plain = peftc.capture(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    with pytest.raises(CheckpointError, match="no transformers model"):
        peftc.save_merged(plain, tmp_path / "out")


@needs_bnb
def test_an_nf4_base_stays_4bit_as_a_bitsandbytes_checkpoint(tmp_path, monkeypatch):
    """`--keep-nf4`: transformers loads the folder with bitsandbytes' Linear4bit holding the bytes
    of peftc's requantizing merge, and computes what that merged graph computes (bitsandbytes
    decoding through tests/bnb_oracle.py, as its CPU decode is wrong on some CPUs; and not
    through its bfloat16 kernel for CPUs with AVX512-BF16, which rounds the activations)."""
    loaded = load_model("tiny-llama")
    gm = peftc.capture(loaded.model, loaded.args, loaded.kwargs)
    trained = perturb(peftc.apply(gm, "nf4, freeze, lora(targets=['q_proj', 'down_proj'])"), 0.3)
    peftc.save_adapter(trained, tmp_path / "adapter")
    steps = f"nf4, load_adapter(path='{tmp_path / 'adapter'}')"
    argv = ["export", "tiny-llama", "--passes", steps, "--transformers", str(tmp_path / "out")]
    assert main([*argv, "--keep-nf4"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_quant_type"] == "nf4"
    monkeypatch.setattr(F, "dequantize_4bit", dequantize)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    merged = peftc.apply(trained, "merge(requantize=true)").eval()
    layer = reloaded.model.layers[1]
    assert isinstance(layer.mlp.down_proj, bnb.nn.Linear4bit)
    assert isinstance(reloaded.lm_head, torch.nn.Linear)  # the head stays dense, as the graph's
    packed = merged.get_buffer("model.layers.1.mlp.down_proj.weight_nf4")
    assert torch.equal(layer.mlp.down_proj.weight.data.reshape(-1), packed.reshape(-1))
    for module in reloaded.modules():  # not its CPU repacking for a bfloat16 kernel
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        close(
            reloaded(*loaded.args, **loaded.kwargs).logits,
            merged(*loaded.args, **loaded.kwargs).logits,
            "bitsandbytes 4-bit folder",
            tol=1e-4,
        )
    with pytest.raises(CheckpointError, match="has none: apply nf4 first"):
        peftc.save_merged(gm, tmp_path / "dense", nf4=True)
