"""peft's `modules_to_save` on every technique: a trainable copy of a whole module, switched with
its adapter, saved under peft's keys; `task_type` fills it in as peft does. Oracle: HF peft."""

import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import peftc
from peftc.errors import OptionError
from peftc.technique.adapters import adapters, delete, disable, set_active
from peftc.tools.models import example_inputs, tiny_config
from peftc.tools.parity import against_peft

from zoo import build, check, graph

# each technique on `lin0` of the zoo's MLP (lin0 -> lin1 -> lin2), saving lin1 whole
CONFIGS = {
    "lora": peft.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]),
    "ia3": peft.IA3Config(
        target_modules=["lin0"], feedforward_modules=[], modules_to_save=["lin1"]
    ),
    "loha": peft.LoHaConfig(target_modules=["lin0"], modules_to_save=["lin1"]),
    "lokr": peft.LoKrConfig(target_modules=["lin0"], modules_to_save=["lin1"]),
    "oft": peft.OFTConfig(r=2, oft_block_size=0, target_modules=["lin0"], modules_to_save=["lin1"]),
    "boft": peft.BOFTConfig(target_modules=["lin0"], boft_block_size=2, modules_to_save=["lin1"]),
    "hra": peft.HRAConfig(target_modules=["lin0"], modules_to_save=["lin1"]),
    "vera": peft.VeraConfig(target_modules=["lin0"], modules_to_save=["lin1"]),
    "fourierft": peft.FourierFTConfig(
        n_frequency=10, target_modules=["lin0"], modules_to_save=["lin1"]
    ),
    # saves its named tensors only (`Technique.saved`): the copy's weights are saved all the same
    "waveft": peft.WaveFTConfig(n_frequency=8, target_modules=["lin0"], modules_to_save=["lin1"]),
}


@pytest.mark.parametrize("method", CONFIGS)
def test_every_technique_trains_a_copy_as_peft(method, tmp_path):
    parity = check("mlp", CONFIGS[method], tmp_path)
    record = adapters(parity.graph)["default"]
    assert record.saved_modules == ("lin1",)
    trainable = {n for n, p in parity.graph.named_parameters() if p.requires_grad}
    assert {"lin1.modules_to_save.default.weight", "lin1.modules_to_save.default.bias"} <= trainable
    assert not {"lin1.weight", "lin1.bias"} & trainable
    keys = set(load_file(tmp_path / "peftc" / "adapter_model.safetensors"))
    assert {"base_model.model.lin1.weight", "base_model.model.lin1.bias"} <= keys


def test_a_saved_module_is_not_adapted_even_if_targeted(tmp_path):
    config = peft.FourierFTConfig(
        n_frequency=10, target_modules=["lin0", "lin1"], modules_to_save=["lin1"]
    )
    parity = check("mlp", config, tmp_path)
    sites = adapters(parity.graph)["default"].sites
    assert sites == (("lin0", "linear"), ("lin1", "module"))


def test_ln_tuning_saves_another_norm(tmp_path):
    config = peft.LNTuningConfig(target_modules=["norm"], modules_to_save=["lin1"])
    parity = check("layernorm", config, tmp_path)
    assert adapters(parity.graph)["default"].saved_modules == ("lin1",)


def test_copies_switch_disable_and_delete_with_their_adapter():
    model, args, _ = build("mlp")
    gm = graph("mlp")
    base = gm(*args)
    gm = peftc.apply(gm, "lora(adapter='a', targets='lin0', modules_to_save='lin2')")
    with pytest.raises(OptionError, match="one active at a time"):
        peftc.apply(gm, "lora(adapter='b', targets='lin0', modules_to_save=['lin2'])")
    disable(gm)
    gm = peftc.apply(gm, "lora(adapter='b', targets='lin0', modules_to_save=['lin2'])")
    with torch.no_grad():
        gm.get_submodule("lin2.modules_to_save.a").weight.add_(1.0)
        gm.get_submodule("lin2.modules_to_save.b").weight.add_(-1.0)
    outputs = {}
    for name in ("a", "b"):
        set_active(gm, name)
        outputs[name] = gm(*args)
        copy = gm.get_submodule(f"lin2.modules_to_save.{name}")
        head = torch.relu(model.lin1(torch.relu(model.lin0(args[0]))))
        torch.testing.assert_close(
            outputs[name], torch.nn.functional.linear(head, copy.weight, copy.bias)
        )
    assert not torch.allclose(outputs["a"], outputs["b"])
    disable(gm)
    torch.testing.assert_close(gm(*args), base)
    set_active(gm, "a")
    delete(gm, "a")
    assert "a" not in dict(gm.get_submodule("lin2.modules_to_save").named_children())
    torch.testing.assert_close(gm(*args), base)


def test_merge_puts_the_copy_in_place_and_unmerge_restores():
    _, args, _ = build("mlp")
    gm = peftc.apply(graph("mlp"), "lora(targets='lin0', modules_to_save='lin2')")
    with torch.no_grad():
        for p in gm.parameters():
            if p.requires_grad:
                p.add_(0.1)
    before, original = gm(*args), gm.get_parameter("lin2.weight").clone()
    merged = peftc.apply(gm, "merge")
    torch.testing.assert_close(merged(*args), before)
    torch.testing.assert_close(
        merged.get_parameter("lin2.weight"), gm.get_parameter("lin2.modules_to_save.default.weight")
    )
    restored = peftc.apply(merged, "unmerge")
    assert torch.equal(restored.get_parameter("lin2.weight"), original)


def test_a_name_that_matches_no_module_is_refused():
    with pytest.raises(OptionError, match="modules_to_save names 'classifer'"):
        peftc.apply(graph("mlp"), "lora(targets='lin0', modules_to_save='classifer')")


def _classifier(arch):
    torch.manual_seed(0)
    cls = {
        "bert": transformers.BertForSequenceClassification,
        "llama": transformers.LlamaForSequenceClassification,
    }
    config = tiny_config(arch)
    config.pad_token_id = 0
    model = cls[arch](config).eval()
    args, kwargs = example_inputs(model, batch=3, seq=9, seed=2)
    return model, args, kwargs


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_seq_cls_task_type_saves_the_head_as_peft(arch, tmp_path):
    model, args, kwargs = _classifier(arch)
    targets = ["query", "value"] if arch == "bert" else ["q_proj", "v_proj"]
    config = peft.LoraConfig(task_type="SEQ_CLS", target_modules=targets)
    parity = against_peft(model, args, kwargs, config, tmp_path)
    head = "classifier" if arch == "bert" else "score"
    assert adapters(parity.graph)["default"].saved_modules == (head,)
    saved = json.loads((tmp_path / "peftc" / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS"
    again = peft.PeftModelForSequenceClassification.from_pretrained(
        _classifier(arch)[0], tmp_path / "peftc"
    ).eval()
    torch.testing.assert_close(again(*args, **kwargs).logits, parity.graph(*args, **kwargs).logits)


def test_prompt_tuning_saves_the_head_under_peft_s_prompt_learning_names(tmp_path):
    """peft's prompt-learning checkpoints name the head `base_model.classifier.*` (its model is
    `base_model` itself): both ways."""
    model, args, kwargs = _classifier("bert")
    config = peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)
    parity = against_peft(model, args, kwargs, config, tmp_path, merge=False)
    assert adapters(parity.graph)["default"].saved_modules == ("classifier",)
    keys = set(load_file(tmp_path / "peftc" / "adapter_model.safetensors"))
    assert keys == {
        "prompt_embeddings",
        "base_model.classifier.weight",
        "base_model.classifier.bias",
    }


def test_a_pipeline_names_the_head(tmp_path):
    model, args, kwargs = _classifier("bert")
    gm = peftc.apply(
        peftc.capture(model, args, kwargs),
        'lora(targets="*.query|*.value", modules_to_save="classifier")',
    )
    assert {n for n, p in gm.named_parameters() if p.requires_grad} >= {
        "classifier.modules_to_save.default.weight"
    }
    with torch.no_grad():
        for p in gm.parameters():
            if p.requires_grad:
                p.add_(0.05)
    peftc.save_adapter(gm, tmp_path)
    again = peft.PeftModel.from_pretrained(_classifier("bert")[0], tmp_path).eval()
    torch.testing.assert_close(again(*args, **kwargs).logits, gm(*args, **kwargs).logits)
