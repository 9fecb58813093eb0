"""Adapters as graph rewrites: structure, several adapters, merge as constant folding, checkpoints,
errors."""

import collections
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftc
from peftc.errors import OptionError, TargetError
from peftc.technique.checkpoint import CheckpointError

from conftest import captured, fill_trainable, loaded


def ops(gm):
    return collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def run(gm):
    lm = loaded("tiny-llama")
    return gm(*lm.args, **lm.kwargs).logits


@pytest.fixture(scope="module")
def base():
    return peftc.apply(captured("tiny-llama"), "freeze")


def test_lora_branch_is_standard_ops_tagged_and_only_adapters_train(base):
    gm = peftc.apply(base, "lora(r=4, alpha=8, dropout=0.1)", check_numerics=True)
    branch = peftc.tagged(gm, adapter="default")
    assert {n.meta["peftc"]["role"] for n in branch} >= {
        "lora_A",
        "lora_B",
        "dropout",
        "scaled",
        "output",
    }
    # peft's default targets
    assert {n.meta["module_path"] for n in branch} == {
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    }
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable == {
        f"model.layers.{i}.self_attn.{p}.lora_{ab}.default.weight"
        for i in (0, 1)
        for p in ("q_proj", "v_proj")
        for ab in "AB"
    }
    torch.testing.assert_close(run(gm), run(base))  # B = 0 at init
    dropout = gm.get_submodule("model.layers.0.self_attn.q_proj.lora_dropout.default")
    assert isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.1


def test_lokr_and_loha_never_build_the_dense_update():
    gm = captured("tiny-llama")
    for text in (
        "lokr(r=4, targets='*.q_proj|*.down_proj')",
        "loha(r=4, targets='*.q_proj|*.down_proj')",
    ):
        rewritten = peftc.apply(gm, text)
        dense = {(64, 64), (64, 128), (128, 64)}  # the (out, in) shapes of the targeted weights
        for node in peftc.tagged(rewritten, adapter="default"):
            shape = tuple(d if isinstance(d, int) else -1 for d in node.meta["val"].shape)
            assert shape not in dense, (text, node.name, node.meta["peftc"]["role"])


def test_several_adapters_switch_disable_delete(base):
    lora_a = fill_trainable(peftc.apply(base, "lora(r=4, adapter='a', targets='*.q_proj')"))
    both = fill_trainable(
        peftc.apply(lora_a, "lora(r=2, adapter='b', targets='*.v_proj|*.q_proj')"), seed=1
    )
    assert peftc.technique.adapters.active_adapters(both) == ["a", "b"]
    out_both = run(both)
    only_a = peftc.apply(both, "set_adapter(name='a')")
    only_b = peftc.apply(both, "set_adapter(name='b')")
    torch.testing.assert_close(run(only_a), run(lora_a))
    assert not torch.allclose(out_both, run(only_a)) and not torch.allclose(out_both, run(only_b))
    disabled = peftc.apply(both, "disable_adapters")
    assert torch.equal(run(disabled), run(base))  # exactly the base output
    assert ops(disabled) == ops(base)
    back = peftc.apply(disabled, "set_adapter(name='b')")
    torch.testing.assert_close(run(back), run(only_b))
    deleted = peftc.apply(both, "delete_adapter(name='a')")
    assert peftc.technique.adapters.active_adapters(deleted) == ["b"]
    assert not [n for n, _ in deleted.named_parameters() if ".a." in n]
    torch.testing.assert_close(run(deleted), run(only_b))
    with pytest.raises(OptionError, match="no adapter named 'c'"):
        peftc.apply(both, "set_adapter(name='c')")


@pytest.mark.parametrize(
    "text",
    [
        "lora(r=4, alpha=8, targets='all-linear')",
        "lora(r=4, alpha=8, dora=true, targets='*.q_proj|*.o_proj|*.down_proj')",
        "lora(r=4, targets='model.embed_tokens|*.v_proj')",
        "loha(r=4, targets='*.k_proj|*.up_proj')",
        "lokr(r=4, targets='*.q_proj|*.gate_proj')",
    ],
)
def test_merge_is_constant_folding(base, text):
    unmerged = fill_trainable(peftc.apply(base, text))
    merged = peftc.apply(unmerged, "merge")
    assert ops(merged) == ops(base)
    assert {n for n, _ in merged.named_parameters()} == {n for n, _ in base.named_parameters()}
    torch.testing.assert_close(run(merged), run(unmerged), rtol=1e-5, atol=1e-5)
    restored = peftc.apply(merged, "unmerge")
    assert ops(restored) == ops(unmerged)
    torch.testing.assert_close(run(restored), run(unmerged), rtol=1e-5, atol=1e-5)
    for name, p in base.named_parameters():
        torch.testing.assert_close(restored.get_parameter(name), p, atol=1e-6, rtol=0)
    with pytest.raises(
        OptionError,
        match=r"nothing to merge: no adapter is active and unmerged; adapters: default \(\w+, "
        r"merged\)",
    ):
        peftc.apply(merged, "merge")


def test_merge_without_keep_cannot_unmerge(base):
    merged = peftc.apply(fill_trainable(peftc.apply(base, "lora(r=2)")), "merge(keep=false)")
    assert peftc.technique.adapters.adapters(merged) == {}
    with pytest.raises(
        OptionError, match="nothing to unmerge: no adapter is merged; adapters: none"
    ):
        peftc.apply(merged, "unmerge")


def test_merged_gpt2_conv1d_keeps_its_layout():
    gm = peftc.apply(captured("tiny-gpt2"), "freeze, lora(r=4, targets='*.c_attn|*.c_fc')")
    fill_trainable(gm)
    lm = loaded("tiny-gpt2")
    merged = peftc.apply(gm, "merge")
    assert merged.get_parameter("transformer.h.0.attn.c_attn.weight").shape == (64, 192)
    torch.testing.assert_close(
        merged(*lm.args, **lm.kwargs).logits, gm(*lm.args, **lm.kwargs).logits, rtol=1e-5, atol=1e-5
    )


def test_adapters_on_a_symbolic_graph():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    gm = fill_trainable(
        peftc.apply(
            peftc.capture(model, (x,), method="symbolic"), "freeze, lora(r=2, targets='0|2')"
        )
    )
    merged = peftc.apply(gm, "merge")
    torch.testing.assert_close(merged(x), gm(x))
    assert not torch.allclose(gm(x), model(x))


def test_active_adapters_add_up_on_one_linear():
    model = torch.nn.Linear(8, 6)
    x = torch.randn(5, 8)
    gm = peftc.apply(
        peftc.capture(model, (x,)),
        "freeze, lora(r=2, adapter='a', targets='all-linear'), loha(r=2, adapter='b', "
        "targets='all-linear')",
    )
    fill_trainable(gm)
    only_a, only_b = (peftc.apply(gm, f"set_adapter(name='{n}')") for n in "ab")
    expected = model(x) + (only_a(x) - model(x)) + (only_b(x) - model(x))
    torch.testing.assert_close(gm(x), expected, atol=1e-6, rtol=1e-5)


def test_checkpoint_save_is_atomic_and_round_trips(base, tmp_path, monkeypatch):
    gm = fill_trainable(peftc.apply(base, "lora(r=4, alpha=16, targets='*.q_proj')"))
    target = tmp_path / "ckpt"
    peftc.save_adapter(gm, target)
    config = json.loads((target / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 16.0)
    keys = set(load_file(target / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    before = (target / "adapter_model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("peftc.technique.checkpoint.save_file", crash)
    other = fill_trainable(peftc.apply(base, "lora(r=4, alpha=16, targets='*.q_proj')"), seed=5)
    with pytest.raises(OSError, match="disk full"):
        peftc.save_adapter(other, target)
    assert (target / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    monkeypatch.undo()
    reloaded = peftc.load_adapter(base, target)
    torch.testing.assert_close(run(reloaded), run(gm))
    merged = peftc.apply(gm, "merge")
    peftc.save_adapter(merged, tmp_path / "from_merged")  # kept weights are saved
    assert set(load_file(tmp_path / "from_merged" / "adapter_model.safetensors")) == keys


def test_checkpoint_errors_list_the_problems(base, tmp_path):
    gm = fill_trainable(peftc.apply(base, "lora(r=4, targets='*.q_proj|*.v_proj')"))
    peftc.save_adapter(gm, tmp_path / "ok")
    tensors = load_file(tmp_path / "ok" / "adapter_model.safetensors")
    missing_key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del tensors[missing_key]
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(3, 64)
    save_file(tensors, tmp_path / "ok" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError) as err:
        peftc.load_adapter(base, tmp_path / "ok")
    message = str(err.value)
    assert f"missing (1): {missing_key}" in message
    assert "unexpected (1): base_model.model.model.layers.0.mlp.up_proj.lora_A.weight" in message
    assert "q_proj.lora_A.weight: file (3, 64), model (4, 64)" in message
    assert not peftc.technique.adapters.adapters(base)  # nothing changed
    with pytest.raises(CheckpointError, match="not a peft adapter folder"):
        peftc.load_adapter(base, tmp_path)
    config = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    (tmp_path / "ok" / "adapter_config.json").write_text(
        json.dumps({**config, "peft_type": "FUTURE_METHOD"})
    )
    with pytest.raises(CheckpointError, match="peft_type .FUTURE_METHOD. is not supported"):
        peftc.load_adapter(base, tmp_path / "ok")


@pytest.mark.parametrize(
    "text, error, message",
    [
        ("lora(r=0)", OptionError, "r must be a positive integer, got 0"),
        ("lora(r=-4)", OptionError, "r must be a positive integer"),
        ("lora(dropout=1.5)", OptionError, "dropout must be in [0, 1)"),
        ("lora(adapter='my adapter')", OptionError, "adapter must be an identifier"),
        ("lora(targets='*.qproj')", TargetError, "model.layers.*.self_attn.q_proj"),
        (
            "lora(lora_bias=true, targets='model.embed_tokens')",
            OptionError,
            "peft does not support lora_bias with an embedding",
        ),
        ("lora, lora", OptionError, "an adapter named 'default' exists"),
        ("lokr(decompose_factor=0)", OptionError, "decompose_factor must be -1"),
        ("loha(r=0)", OptionError, "loha: r must be a positive integer"),
        ("unmerge(adapter='x')", OptionError, "no adapter named 'x'"),
    ],
)
def test_bad_adapter_options(base, text, error, message):
    with pytest.raises(error) as err:
        peftc.apply(base, text)
    assert message in str(err.value)


def test_no_default_targets_for_unknown_models():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    gm = peftc.capture(model, (torch.randn(2, 4),))
    with pytest.raises(OptionError, match="no default targets"):
        peftc.apply(gm, "lora")
    assert (
        len(peftc.technique.adapters.adapters(peftc.apply(gm, "lora(targets='all-linear')"))) == 1
    )


def test_default_targets_come_from_a_wrapped_transformer():
    from peftc.tools.demo import SentimentModel
    from peftc.tools.models import tiny_model

    encoder = tiny_model("bert")
    model = SentimentModel(encoder, encoder.config.hidden_size).eval()
    ids = torch.randint(0, 100, (2, 5))
    gm = peftc.apply(peftc.capture(model, (ids, torch.ones_like(ids))), "freeze, lora(r=4)")
    layers = encoder.config.num_hidden_layers
    paths = [path for path, _ in peftc.technique.adapters.adapters(gm)["default"].sites]
    assert len(paths) == 2 * layers and all(p.endswith((".query", ".value")) for p in paths)


def test_lora_on_meta_device():
    from transformers import LlamaForCausalLM

    from peftc.tools.models import tiny_config

    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_config("llama"))
        ids = torch.randint(0, 256, (2, 8))
    gm = peftc.apply(
        peftc.capture(model, (ids,), dynamic=False), "freeze, lora(r=8, targets='all-linear')"
    )
    # r * (in + out) per linear: q, o 64->64; k, v 64->32; gate, up 64->128; down 128->64; two
    # layers
    per_layer = 8 * (2 * 128 + 2 * 96 + 3 * 192)
    assert peftc.summary(gm).trainable == 2 * per_layer
    assert all(p.device.type == "meta" for p in gm.parameters())
