"""The `adapter` pass (bottleneck adapters) against hand computations of adapter-hub's formulas, run
as hooks on the original transformers modules: Houlsby, Pfeiffer and parallel on BERT (post-LN),
GPT-2 and Llama (pre-LN); outputs and the adapter tensors' gradients. Then the lifecycle: identity
at init, several adapters, merge leaving them in place, checkpoints, ONNX, and composition with nf4
and LoRA."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F

import peftc
from peftc.errors import CheckpointError, OptionError, PassError
from peftc.tools.models import example_inputs
from peftc.tools.parity import close

from conftest import ARCHITECTURES, captured, fill_trainable, loaded, onnx_runtime_gap

ACT = {"swish": F.silu, "relu": F.relu, "gelu": F.gelu}


def sublayers(arch, model):
    """Per block: (peftc site path, kind, module whose output is h, hook giving the stream x,
    post-LN or None)."""
    out = []
    if arch == "llama":
        for i, layer in enumerate(model.model.layers):
            out += [
                (
                    f"model.layers.{i}.self_attn",
                    "attention",
                    layer.self_attn,
                    (layer.input_layernorm, 0),
                    None,
                ),
                (
                    f"model.layers.{i}.mlp",
                    "feed_forward",
                    layer.mlp,
                    (layer.post_attention_layernorm, 0),
                    None,
                ),
            ]
    elif arch == "gpt2":
        for i, block in enumerate(model.transformer.h):
            out += [
                (f"transformer.h.{i}.attn", "attention", block.attn, (block.ln_1, 0), None),
                (f"transformer.h.{i}.mlp", "feed_forward", block.mlp, (block.ln_2, 0), None),
            ]
    # BERT: BertSelfOutput / BertOutput(h, input_tensor) -> LayerNorm(dropout(dense(h)) +
    # input_tensor)
    else:
        for i, layer in enumerate(model.encoder.layer):
            for name, sub, kind in (
                ("attention", layer.attention.output, "attention"),
                ("output", layer.output, "feed_forward"),
            ):
                out.append(
                    (f"encoder.layer.{i}.{name}", kind, sub.dropout, (sub, 1), sub.LayerNorm)
                )
    return out


def reference(arch, gm, placement, activation, scaling, adapter="default"):
    """A copy of the transformers model with hooks computing the placement's formula with `gm`'s
    adapter tensors (cloned as leaves), and those leaves by peftc name."""
    model = copy.deepcopy(loaded(f"tiny-{arch}").model).eval()
    leaves = {}
    for path, kind, produces, (stream_module, index), norm in sublayers(arch, model):
        if placement != "houlsby" and kind == "attention":
            continue
        names = {
            k: f"{path}.adapter_{a}.{adapter}.{w}"
            for k, a, w in (
                ("dw", "down", "weight"),
                ("db", "down", "bias"),
                ("uw", "up", "weight"),
                ("ub", "up", "bias"),
            )
        }
        p = {
            k: leaves.setdefault(q, gm.get_parameter(q).detach().clone().requires_grad_(True))
            for k, q in names.items()
        }
        stream = {}
        stream_module.register_forward_pre_hook(
            lambda m, args, s=stream, i=index: s.update(x=args[i])
        )

        def f(v, p=p):
            return scaling * F.linear(
                ACT[activation](F.linear(v, p["dw"], p["db"])), p["uw"], p["ub"]
            )

        def hook(module, args, output, s=stream, f=f, norm=norm):
            h = output[0] if isinstance(output, tuple) else output
            if placement == "houlsby":
                new = h + f(h)
            # post-LN: LN(x + h + f(LN(x + h))); pre-LN: x + h + f(x + h)
            elif placement == "pfeiffer":
                new = h + f(norm(s["x"] + h) if norm is not None else s["x"] + h)
            else:
                new = h + f(s["x"])
            return (new, *output[1:]) if isinstance(output, tuple) else new

        produces.register_forward_hook(hook)
    return model, leaves


def test_sublayer_sites_name_the_sublayer_and_find_post_ln_norms_only_inside_blocks():
    from peftc.sites import sublayer_sites

    bert = sublayer_sites(captured("tiny-bert"))
    assert [(s.kind, s.path) for s in bert[:2]] == [
        ("attention", "encoder.layer.0.attention"),
        ("feed_forward", "encoder.layer.0.output"),
    ]
    assert [s.norm.meta["module_path"] for s in bert[:2]] == [
        "encoder.layer.0.attention.output.LayerNorm",
        "encoder.layer.0.output.LayerNorm",
    ]
    # pre-LN: ln_f reads the last block's stream alone, outside it
    gpt2 = sublayer_sites(captured("tiny-gpt2"))
    assert [s.path for s in gpt2] == [
        "transformer.h.0.attn",
        "transformer.h.0.mlp",
        "transformer.h.1.attn",
        "transformer.h.1.mlp",
    ] and all(s.norm is None for s in gpt2)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize(
    "placement,activation,scaling",
    [("houlsby", "swish", 1.0), ("pfeiffer", "relu", 1.0), ("parallel", "relu", 4.0)],
)
def test_formulas_against_hooks_on_the_original_modules(arch, placement, activation, scaling):
    # "houlsby" init draws small weights; fill_trainable moves them off any special value
    gm = fill_trainable(
        peftc.apply(captured(f"tiny-{arch}"), f"adapter(placement='{placement}', init='houlsby')")
    )
    model, leaves = reference(arch, gm, placement, activation, scaling)
    args, kwargs = example_inputs(model, batch=3, seq=7, seed=2)  # not the capture's shapes
    kwargs["attention_mask"][0, 5:] = 0
    ours, theirs = gm(*args, **kwargs)[0], model(*args, **kwargs)[0]
    assert (
        ours - loaded(f"tiny-{arch}").model(*args, **kwargs)[0]
    ).abs().max() > 1e-3  # the adapters act
    close(ours, theirs, "outputs")
    weight = torch.randn_like(ours, generator=torch.Generator().manual_seed(0))
    (ours * weight).sum().backward()
    (theirs * weight).sum().backward()
    assert len(leaves) == {"houlsby": 8, "pfeiffer": 4, "parallel": 4}[placement] * 2  # two blocks
    for name, leaf in leaves.items():
        close(gm.get_parameter(name).grad, leaf.grad, f"gradient of {name}")


def test_defaults_and_shapes_follow_adapter_hub():
    # houlsby: attention and feed-forward, d/16, swish, bert init
    gm = peftc.apply(captured("tiny-llama"), "adapter")
    down = gm.get_parameter("model.layers.0.self_attn.adapter_down.default.weight")
    assert down.shape == (64 // 16, 64) and gm.get_parameter(
        "model.layers.1.mlp.adapter_up.default.weight"
    ).shape == (64, 4)
    assert (
        0.01 < down.std() < 0.03
        and gm.get_parameter("model.layers.0.mlp.adapter_up.default.bias").abs().max() == 0
    )
    assert {n for n, p in gm.named_parameters() if p.requires_grad} == {
        n for n, _ in gm.named_parameters() if ".adapter_" in n
    }
    parallel = peftc.apply(captured("tiny-llama"), "adapter(placement='parallel')")
    # d/2
    assert parallel.get_parameter("model.layers.0.mlp.adapter_down.default.weight").shape == (
        32,
        64,
    )
    assert not any("self_attn.adapter" in n for n, _ in parallel.named_parameters())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_zero_up_is_the_identity_at_init(arch):
    # frozen like the adapted graph (T5's kernels differ by 1e-6)
    base = peftc.apply(captured(f"tiny-{arch}"), "freeze")
    gm = peftc.apply(base, "adapter(init='zero_up')")
    assert any(".adapter_up." in n for n, _ in gm.named_parameters())
    args, kwargs = example_inputs(loaded(f"tiny-{arch}").model, batch=2, seq=9, seed=1)
    torch.testing.assert_close(gm(*args, **kwargs)[0], base(*args, **kwargs)[0], atol=0, rtol=0)


def test_several_adapters_switch_merge_and_delete():
    base = captured("tiny-llama")
    gm = fill_trainable(
        peftc.apply(base, "adapter(adapter='a'), adapter(placement='pfeiffer', adapter='b')")
    )
    args, kwargs = example_inputs(loaded("tiny-llama").model, batch=2, seq=9, seed=1)
    both = gm(*args, **kwargs)[0]
    only_a = peftc.apply(gm, "set_adapter(name='a')")
    only_b = peftc.apply(gm, "set_adapter(name='b')")
    assert (only_a(*args, **kwargs)[0] - both).abs().max() > 1e-4
    assert (only_a(*args, **kwargs)[0] - only_b(*args, **kwargs)[0]).abs().max() > 1e-4
    off = peftc.apply(gm, "disable_adapters")
    torch.testing.assert_close(off(*args, **kwargs)[0], base(*args, **kwargs)[0], atol=0, rtol=0)
    back = peftc.apply(off, "set_adapter(name='b'), set_adapter(name='a')")
    torch.testing.assert_close(back(*args, **kwargs)[0], only_a(*args, **kwargs)[0], atol=0, rtol=0)

    result = peftc.Pipeline.parse("merge").run(gm)
    assert (
        not result.results[0].modified
        and "a (adapter), b (adapter) stay in the graph" in result.results[0].report
    )
    torch.testing.assert_close(result.graph_module(*args, **kwargs)[0], both, atol=0, rtol=0)
    deleted = peftc.apply(gm, "delete_adapter(name='a')")
    assert not any(".adapter_down.a." in n for n, _ in deleted.named_parameters())
    torch.testing.assert_close(
        deleted(*args, **kwargs)[0], only_b(*args, **kwargs)[0], atol=0, rtol=0
    )


def test_with_lora_and_merge_against_peft_lora_plus_hooks():
    """LoRA (peft the oracle) and a Houlsby adapter in one pipeline; merge folds LoRA and keeps the
    adapter."""
    gm = fill_trainable(
        peftc.apply(
            captured("tiny-llama"),
            "freeze, lora(r=4, targets='*.o_proj|*.down_proj'), adapter(init='houlsby', "
            "adapter='bn')",
        )
    )
    model, _ = reference("llama", gm, "houlsby", "swish", 1.0, adapter="bn")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["o_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.copy_(gm.get_parameter(name.removeprefix("base_model.model.")))
    args, kwargs = example_inputs(loaded("tiny-llama").model, batch=2, seq=9, seed=3)
    expected = lora(*args, **kwargs)[0]
    close(gm(*args, **kwargs)[0], expected, "outputs")
    merged = peftc.Pipeline.parse("merge").run(gm)
    assert "bn (adapter) stays in the graph" in merged.results[0].report
    assert not any("lora_" in n for n, _ in merged.graph_module.named_parameters())
    close(merged.graph_module(*args, **kwargs)[0], expected, "merged outputs")


def test_onnx_export_keeps_the_blocks(tmp_path):
    pytest.importorskip("onnxruntime")
    gm = fill_trainable(peftc.apply(captured("tiny-bert"), "adapter(placement='houlsby')"))
    # nothing to merge: the blocks are the model
    assert onnx_runtime_gap(gm, "tiny-bert", tmp_path / "houlsby.onnx") < 1e-4


def test_over_nf4_equals_the_dequantized_base_with_hooks():
    from peftc.sites import linear_sites
    from peftc.sites.formats import read_weight

    gm = fill_trainable(
        peftc.apply(
            captured("tiny-llama"), "nf4(targets='model.*'), freeze, adapter(placement='pfeiffer')"
        )
    )
    model, _ = reference("llama", gm, "pfeiffer", "relu", 1.0)
    with torch.no_grad():
        for site in linear_sites(gm, "model.*"):
            if site.storage == "nf4":
                model.get_submodule(site.path).weight.copy_(read_weight(gm, site))
    args, kwargs = example_inputs(model, batch=2, seq=9, seed=3)
    torch.testing.assert_close(
        gm(*args, **kwargs)[0], model(*args, **kwargs)[0], atol=1e-5, rtol=1e-5
    )
    swapped = peftc.apply(
        captured("tiny-llama"), "adapter(placement='pfeiffer'), nf4(targets='model.*'), freeze"
    )
    swapped.load_state_dict(gm.state_dict())  # the order of nf4 and adapter does not matter
    torch.testing.assert_close(swapped(*args, **kwargs)[0], gm(*args, **kwargs)[0], atol=0, rtol=0)


def test_checkpoint_round_trip_and_errors(tmp_path):
    gm = fill_trainable(
        peftc.apply(captured("tiny-bert"), "adapter(placement='pfeiffer', reduction_factor=8)")
    )
    folder = peftc.save_adapter(gm, tmp_path / "pfeiffer")
    loaded_gm = peftc.load_adapter(captured("tiny-bert"), folder)
    args, kwargs = example_inputs(loaded("tiny-bert").model, batch=2, seq=9, seed=3)
    torch.testing.assert_close(
        loaded_gm(*args, **kwargs)[0], gm(*args, **kwargs)[0], atol=0, rtol=0
    )
    with pytest.raises(CheckpointError, match="does not fit"):
        peftc.load_adapter(captured("tiny-llama"), folder)


@pytest.mark.parametrize(
    "options,match",
    [
        ("reduction_factor=128", "larger than the hidden size 64"),
        ("activation='swishy'", "activation must be one of relu, swish.*got 'swishy'"),
        ("scaling='learned'", "'learned' and 'channel'"),
        ("placement='sequential'", "'placement' of pass 'adapter' must be one of 'houlsby'"),
    ],
)
def test_bad_options_are_named_errors(options, match):
    with pytest.raises(OptionError, match=match):
        peftc.apply(captured("tiny-llama"), f"adapter({options})")


def test_a_graph_without_blocks_is_a_named_error():
    plain = peftc.capture(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(2, 4),))
    with pytest.raises(PassError, match="no feed_forward sublayer found"):
        peftc.apply(plain, "adapter(placement='pfeiffer')")
