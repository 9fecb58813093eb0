"""IA3 against HF peft (IA3Config): outputs, gradients, checkpoints both ways, merge, and IA3 next
to LoRA.

Adapters made in peft are checked with `peftc.tools.parity.against_peft`; adapters made in peftc go
to peft through `save_adapter`.
"""

import copy
import json

import peft
import pytest
import torch
from torch import nn

import peftc
import peftc.techniques.ia3
from peftc.errors import OptionError, TargetError
from peftc.ir.pipeline import Pipeline
from peftc.technique.adapters import adapters, set_active
from peftc.tools.models import example_inputs, tiny_model
from peftc.tools.parity import against_peft, close

from conftest import captured, fill_trainable, loaded
from zoo import check, symbolic, with_pooler


def peft_stages(peft_model):
    return {
        n.removeprefix("base_model.model."): "input" if m.is_feedforward else "output"
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.ia3.IA3Layer)
    }


# "-default": peft's default targets and feed-forward modules (gpt2's are Conv1D layers,
# fan_in_fan_out)
CELLS = {
    "mlp": ("mlp", peft.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"])),
    "conv2d": (
        "conv2d",
        peft.IA3Config(target_modules=["conv0", "conv1"], feedforward_modules=["conv1"]),
    ),
    "llama": (
        "llama",
        peft.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
    ),
    "gpt2": (
        "gpt2",
        peft.IA3Config(
            target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"], fan_in_fan_out=True
        ),
    ),
    "bert": (
        "bert",
        peft.IA3Config(
            target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]
        ),
    ),
    "llama-default": ("llama", peft.IA3Config()),
    "bert-default": ("bert", peft.IA3Config()),
    "gpt2-default": ("gpt2", peft.IA3Config()),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    parity = check(*CELLS[cell], tmp_path)
    stages = adapters(parity.graph)["default"].stages
    assert stages == peft_stages(parity.peft) and set(stages.values()) == {"input", "output"}


def test_bert_feedforward_suffixes_have_no_dot_boundary(tmp_path):
    """peft's `output.dense` also selects `attention.output.dense` (suffix match without a dot)."""
    config = peft.IA3Config(
        target_modules=["query", "dense", "output.dense"], feedforward_modules=["output.dense"]
    )
    parity = check("bert", config, tmp_path, view=with_pooler)  # `dense` selects the pooler's too
    stages = adapters(parity.graph)["default"].stages
    assert stages == peft_stages(parity.peft)
    assert stages["encoder.layer.0.attention.output.dense"] == "input"
    assert stages["encoder.layer.0.intermediate.dense"] == "output"


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.proj, self.out_proj = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.out_proj(torch.relu(self.proj(torch.relu(self.fc1(x)))))


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.grouped, self.head = (
            nn.Conv2d(3, 8, 3),
            nn.Conv2d(8, 4, 3, padding=1, groups=2),
            nn.Linear(4, 4),
        )
        self.volume = nn.Conv3d(2, 4, (1, 3, 3), bias=False)

    def forward(self, x):
        h = self.grouped(torch.relu(self.conv(x)))  # (N, 4, 6, 6)
        v = self.volume(h.reshape(-1, 2, 2, 6, 6))  # the channels as (2, depth 2)
        return self.head(h.mean((2, 3))) + v.mean((2, 3, 4))


@pytest.mark.parametrize("method", ["symbolic", "export"])
def test_mlp_parity_with_peft(method, tmp_path):
    torch.manual_seed(0)
    # `proj` as feed-forward suffix selects `out_proj` too, as in peft
    config = peft.IA3Config(
        target_modules=["fc1", "proj", "out_proj"], feedforward_modules=["proj"]
    )
    x = torch.randn(5, 8)
    model = MLP()
    graph = peftc.apply(peftc.capture(copy.deepcopy(model), (x,), method=method), "freeze")
    parity = against_peft(model, (x,), {}, config, tmp_path, graph=graph)
    assert (
        adapters(parity.graph)["default"].stages
        == peft_stages(parity.peft)
        == {"fc1": "output", "proj": "input", "out_proj": "input"}
    )


def test_saved_feedforward_modules_select_exactly_the_same_layers_in_peft(tmp_path):
    """`proj` alone is feed-forward here; peft would read a saved `["proj"]` as a suffix of
    `out_proj`."""
    model = MLP()
    x = torch.randn(5, 8)
    gm = peftc.apply(
        peftc.capture(copy.deepcopy(model), (x,), method="symbolic"),
        "freeze, ia3(targets='proj|out_proj', feedforward_modules='proj')",
    )
    fill_trainable(gm)
    peftc.save_adapter(gm, tmp_path)
    assert (
        json.loads((tmp_path / "adapter_config.json").read_text())["feedforward_modules"]
        == "(?:proj)"
    )
    reloaded = peft.PeftModel.from_pretrained(model, tmp_path)
    assert (
        peft_stages(reloaded)
        == adapters(gm)["default"].stages
        == {"proj": "input", "out_proj": "output"}
    )
    close(gm(x), reloaded(x), "peft on peftc's checkpoint")


def test_conv_parity_with_peft(tmp_path):
    """Conv2d (output), a grouped Conv2d (input: its merge scales each output channel's input
    slice), Conv3d."""
    torch.manual_seed(0)
    config = peft.IA3Config(
        target_modules=["conv", "grouped", "volume", "head"], feedforward_modules=["grouped"]
    )
    x = torch.randn(2, 3, 8, 8)
    model = Convs()
    parity = against_peft(model, (x,), {}, config, tmp_path, graph=symbolic(model, (x,)))
    assert {n: tuple(p.shape) for n, p in parity.graph.named_parameters() if p.requires_grad} == {
        "conv.ia3_l.default": (1, 8, 1, 1),
        "grouped.ia3_l.default": (1, 8, 1, 1),
        "volume.ia3_l.default": (1, 4, 1, 1, 1),
        "head.ia3_l.default": (4, 1),
    }


def test_conv1d_and_models_without_feedforward_defaults_are_refused():
    model = nn.Sequential(nn.Conv1d(2, 4, 3))
    gm = peftc.capture(model, (torch.randn(1, 2, 8),), method="symbolic")
    with pytest.raises(OptionError, match="is a Conv1d, which peft's IA3 does not support"):
        peftc.apply(gm, "ia3(targets='0', feedforward_modules=[])")
    gm = peftc.capture(MLP(), (torch.randn(2, 8),), method="symbolic")
    with pytest.raises(OptionError, match="no default feedforward_modules for this model"):
        peftc.apply(gm, "ia3(targets='fc1')")
    with pytest.raises(TargetError, match="matches no linear or conv site"):
        peftc.apply(gm, "ia3(targets='*.nothing', feedforward_modules=[])")
    with pytest.raises(OptionError, match="feedforward_modules must be a regex"):
        peftc.apply(gm, "ia3(targets='fc1', feedforward_modules='fc(')")
    regex = peftc.apply(gm, "ia3(targets='fc1|proj', feedforward_modules='pro.')")
    assert adapters(regex)["default"].stages == {"fc1": "output", "proj": "input"}


def test_pass_text_round_trips():
    pipeline = Pipeline.parse(
        "ia3(targets='*.v_proj|*.down_proj', feedforward_modules=['down_proj'], adapter='x')"
    )
    assert Pipeline.parse(str(pipeline)) == pipeline
    assert pipeline.steps[0].options.feedforward_modules == ("down_proj",)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_adapters_load_in_peft(arch, tmp_path):
    model = tiny_model(arch)
    args, kwargs = example_inputs(model)
    gm = fill_trainable(peftc.apply(captured(f"tiny-{arch}"), "freeze, ia3"))
    peftc.save_adapter(gm, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"]
    reloaded = peft.PeftModel.from_pretrained(model, tmp_path)
    assert peft_stages(reloaded) == adapters(gm)["default"].stages
    close(
        gm(*args, **kwargs)[0],
        reloaded(*args, **kwargs, use_cache=False)[0],
        "peft on peftc's checkpoint",
    )
    again = peftc.load_adapter(peftc.apply(captured(f"tiny-{arch}"), "freeze"), tmp_path)
    torch.testing.assert_close(again(*args, **kwargs)[0], gm(*args, **kwargs)[0], atol=0, rtol=0)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_merge_unmerge_round_trip(name):
    lm = loaded(name)
    base = peftc.apply(captured(name), "freeze")
    unmerged = fill_trainable(peftc.apply(base, "ia3"))
    run = lambda gm: gm(*lm.args, **lm.kwargs)[0]  # noqa: E731
    merged = peftc.apply(unmerged, "merge")
    assert not peftc.tagged(merged, adapter="default")
    torch.testing.assert_close(run(merged), run(unmerged), atol=1e-5, rtol=1e-5)
    restored = peftc.apply(merged, "unmerge")
    torch.testing.assert_close(run(restored), run(unmerged), atol=0, rtol=0)
    for n, p in base.named_parameters():
        # the originals come back exactly, not divided by l
        assert torch.equal(restored.get_parameter(n), p), n


@pytest.mark.parametrize(
    "field, value",
    [("exclude_modules", ["layers.1.self_attn.k_proj"]), ("modules_to_save", ["lm_head"])],
)
def test_exclude_modules_and_modules_to_save_match_peft(field, value, tmp_path):
    parity = check("llama", peft.IA3Config(**{field: value}), tmp_path)
    record = adapters(parity.graph)["default"]
    sites = {path for path, kind in record.sites if kind != "module"}
    assert sites == set(parity.peft.base_model.targeted_module_names)
    assert ("model.layers.1.self_attn.k_proj" in sites) == (field != "exclude_modules")
    assert record.saved_modules == (("lm_head",) if field == "modules_to_save" else ())


class VProj(nn.Module):
    def __init__(self):
        super().__init__()
        self.v_proj = nn.Linear(8, 6)

    def forward(self, x):
        return self.v_proj(x)


def lora_then_ia3(base, ia3_first):
    steps = [
        "lora(r=2, alpha=4, adapter='a', targets='v_proj|*.v_proj')",
        "ia3(adapter='b', targets='v_proj|*.v_proj', feedforward_modules=[])",
    ]
    gm = peftc.apply(base, "freeze")
    for step in steps[::-1] if ia3_first else steps:
        gm = fill_trainable(peftc.apply(gm, step), seed=len(adapters(gm)))
    return gm


def test_lora_and_ia3_on_one_site_in_either_order():
    """The output scale applies to the base output only: y = (W x) * l + s B A x, whichever came
    first, and again after disabling and re-activating them."""
    lm = loaded("tiny-llama")
    run = lambda gm: gm(*lm.args, **lm.kwargs).logits  # noqa: E731
    first = lora_then_ia3(captured("tiny-llama"), ia3_first=False)
    second = lora_then_ia3(captured("tiny-llama"), ia3_first=True)
    for name in ("a", "b"):  # the same weights in both, whatever the order they were made in
        for path, tensor in peftc.technique.adapters.adapter_tensors(first, name).items():
            with torch.no_grad():
                second.get_parameter(path).copy_(tensor)
    assert torch.equal(run(first), run(second))

    model = VProj()
    x = torch.randn(4, 8)
    gms = [
        lora_then_ia3(peftc.capture(model, (x,), method="symbolic"), ia3_first=order)
        for order in (False, True)
    ]
    for gm in gms:
        A, B = (
            gm.get_parameter("v_proj.lora_A.a.weight"),
            gm.get_parameter("v_proj.lora_B.a.weight"),
        )
        scale = gm.get_parameter("v_proj.ia3_l.b").flatten()
        expected = model.v_proj(x) * scale + 2.0 * (x @ A.T @ B.T)
        torch.testing.assert_close(gm(x), expected, atol=1e-6, rtol=1e-5)
        merged = peftc.apply(gm, "merge")
        torch.testing.assert_close(merged(x), expected, atol=1e-6, rtol=1e-5)
        disabled = peftc.apply(gm, "disable_adapters")
        assert torch.equal(disabled(x), model.v_proj(x))
        torch.testing.assert_close(
            peftc.apply(disabled, "set_adapter(name='b')")(x), model.v_proj(x) * scale
        )
        torch.testing.assert_close(
            set_active(disabled, ["a", "b"])(x), expected, atol=1e-6, rtol=1e-5
        )

    for gm in (first, second):
        expected = run(gm)
        disabled = peftc.apply(gm, "disable_adapters")
        assert torch.equal(set_active(disabled, ["b", "a"])(*lm.args, **lm.kwargs).logits, expected)


def test_ia3_on_nf4_matches_peft_on_bitsandbytes_linear4bit(tmp_path, monkeypatch):
    pytest.importorskip(
        "bitsandbytes", reason="bitsandbytes is the NF4 oracle: pip install bitsandbytes"
    )
    from bnb_oracle import linear4bit_model

    def quantized(model):
        model = linear4bit_model(model, monkeypatch)
        model.is_loaded_in_4bit = True  # so peft builds its bitsandbytes IA3 layers
        return model

    model = tiny_model("llama")
    graph = peftc.apply(captured("tiny-llama"), "nf4, freeze")  # the same weights as `model`
    parity = against_peft(
        model,
        *example_inputs(model),
        peft.IA3Config(),
        tmp_path,
        graph=graph,
        prepare=quantized,
        merge=False,
    )
    assert (
        type(parity.peft.get_submodule("base_model.model.model.layers.0.mlp.down_proj")).__name__
        == "Linear4bit"
    )
    ours = parity.graph
    assert {
        s.storage for s in peftc.linear_sites(ours) if s.path in adapters(ours)["default"].stages
    } == {"nf4"}
    assert sum(p.requires_grad for p in ours.parameters()) == 6
