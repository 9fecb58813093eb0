"""A finetuned graph as a transformers folder (`peftc.save_merged`, `peftc export --transformers`):
what `AutoModel*.from_pretrained` loads computes what peft's `merge_and_unload` computes."""

import copy

import peft
import pytest
import torch
import transformers

import peftc
from peftc.errors import CheckpointError
from peftc.tools.cli import main
from peftc.tools.models import example_inputs, load_model, save_tiny_chat_model
from peftc.tools.parity import close, perturb


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
