"""What the technique layer and the pass manager enforce for every technique."""

import copy
import json
from dataclasses import dataclass

import peft
import pytest
import torch
from torch import nn

import peftc
from peftc.errors import OptionError, PassError, TargetError
from peftc.technique import AdapterOptions, Param, Technique
from peftc.technique.adapters import adapters
from peftc.tools.parity import close

from conftest import captured, fill_trainable, loaded

aten = torch.ops.aten


def test_a_peft_adapter_with_dropout_loaded_into_an_eval_graph_follows_eval(tmp_path):
    """The reported silent wrong result: inserted dropout stayed in training mode (outputs 2.1
    away)."""
    lm = loaded("tiny-llama")
    model = copy.deepcopy(lm.model).eval()
    peft_model = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]),
    )
    fill_trainable(peft_model, seed=3)
    peft_model.save_pretrained(tmp_path)
    peft_model.eval()
    gm = peftc.capture(model, lm.args, lm.kwargs)
    assert not gm.training
    loaded_gm = peftc.load_adapter(gm, tmp_path)
    dropouts = [m for n, m in loaded_gm.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and not any(m.training for m in dropouts)
    with torch.no_grad():
        expected = peft_model(*lm.args, **lm.kwargs, use_cache=False).logits
        close(loaded_gm(*lm.args, **lm.kwargs).logits, expected, "outputs in eval mode")
    loaded_gm.train()
    assert all(m.training for m in dropouts)  # and train() still switches them


def test_adapter_passes_freeze_the_base_as_get_peft_model_does():
    gm = captured("tiny-llama")
    assert any(p.requires_grad for p in gm.parameters())
    frozen = peftc.apply(gm, "lora(r=2)")
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    both = peftc.apply(frozen, "loha(r=2, adapter='b', targets='*.k_proj')")
    assert {
        n for n, p in both.named_parameters() if p.requires_grad
    } >= trainable  # other adapters stay trainable
    kept = peftc.apply(gm, "lora(r=2, freeze_base=false)")
    assert kept.get_parameter("model.embed_tokens.weight").requires_grad
    assert gm.get_parameter(
        "model.embed_tokens.weight"
    ).requires_grad  # the input graph is untouched


@pytest.mark.parametrize(
    "text, error, message",
    [
        ("lora(targets='*.no_such_proj')", TargetError, "matches no"),
        ("ia3_missing", Exception, "unknown pass"),
    ],
)
def test_targets_that_select_nothing_are_errors(text, error, message):
    with pytest.raises(error, match=message):
        peftc.apply(captured("tiny-llama"), text)


def test_all_linear_on_a_graph_without_linears_is_an_error():
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU())
    gm = peftc.capture(model, (torch.randn(2, 3, 8),))
    with pytest.raises(OptionError, match='all-linear" selects no linear site'):
        peftc.apply(gm, "lora(targets='all-linear')")


def test_merge_and_switches_say_what_exists():
    gm = peftc.apply(captured("tiny-llama"), "lora(r=2, adapter='a')")
    with pytest.raises(
        OptionError, match=r"nothing to unmerge: no adapter is merged; adapters: a \(lora, active\)"
    ):
        peftc.apply(gm, "unmerge")
    with pytest.raises(OptionError, match="no adapter named 'b'; adapters: a"):
        peftc.apply(gm, "merge(adapter='b')")
    with pytest.raises(OptionError, match="nothing to merge.*adapters: none"):
        peftc.apply(captured("tiny-llama"), "merge")
    again = peftc.apply(gm, "set_adapter(name='a')")
    assert again.meta["peftc"]["history"][-1]["report"] == "active: a (already the only one)"


def test_the_manager_tags_every_node_and_needs_a_reason_for_no_change():
    @peftc.register_pass("test_untagged_double", replace=True)
    def double(gm):
        """y -> 2 y at the output, without tagging the node."""
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            doubled = gm.graph.call_function(aten.mul.Tensor, (out.args[0][0], 2))
        out.args = ((doubled, *out.args[0][1:]),)
        return peftc.PassResult(gm, modified=True)

    @peftc.register_pass("test_silent", replace=True)
    def silent(gm):
        """Changes nothing and says nothing."""
        return peftc.PassResult(gm, modified=False)

    model = nn.Linear(4, 3)
    gm = peftc.apply(peftc.capture(model, (torch.randn(2, 4),)), "test_untagged_double")
    added = [
        n for n in gm.graph.nodes if n.meta.get("peftc", {}).get("pass") == "test_untagged_double"
    ]
    assert len(added) == 1 and added[0].meta["peftc"]["role"] == "inserted"
    with pytest.raises(PassError, match="changed nothing and did not say why"):
        peftc.apply(gm, "test_silent")


def test_export_merged_refuses_any_unmerged_technique(tmp_path):
    onnx_backend = pytest.importorskip("peftc.backends.onnx")
    gm = peftc.apply(
        captured("tiny-llama"), "lora(r=2), loha(r=2, adapter='b', targets='*.k_proj')"
    )
    with pytest.raises(peftc.errors.ExportError, match=r"'b' \(loha\), 'default' \(lora\)"):
        onnx_backend.export(gm, tmp_path / "m.onnx", merged=True)
    assert not (tmp_path / "m.onnx").exists()


@dataclass(frozen=True)
class BiasShiftOptions(AdapterOptions):
    pass


def test_a_technique_declared_in_a_few_lines_gets_merge_save_and_switching(tmp_path):
    @peftc.technique.adapters.register_technique
    class BiasShift(Technique):
        """y -> y + d: a trainable shift of a linear's output (BitFit-like)."""

        name, options, stage, peft_type = "test_bias_shift", BiasShiftOptions, "add", None

        def params(self, ctx):
            return [Param("shift", (ctx.site.out_features,))]

        def build(self, b, x):
            return b.param("shift")

        def fold(self, ctx, weight, bias):
            return weight, ctx.tensor("shift").float() + (0 if bias is None else bias)

    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(6, 4)
    gm = fill_trainable(peftc.apply(peftc.capture(model, (x,)), "test_bias_shift(targets='0|2')"))
    shifted = gm(x)
    expected = model[2](
        torch.relu(model[0](x) + gm.get_parameter("0.shift.default"))
    ) + gm.get_parameter("2.shift.default")
    torch.testing.assert_close(shifted, expected)
    merged = peftc.apply(gm, "merge")
    torch.testing.assert_close(merged(x), shifted)
    assert merged.get_parameter("0.bias").requires_grad is False
    torch.testing.assert_close(peftc.apply(merged, "unmerge")(x), shifted)
    torch.testing.assert_close(peftc.apply(gm, "disable_adapters")(x), model(x))
    assert isinstance(adapters(gm)["default"], peftc.technique.adapters.Adapter)
    # no peft_type: peftc's variant of peft's folder
    folder = peftc.save_adapter(gm, tmp_path / "a")
    assert (
        json.loads((folder / "adapter_config.json").read_text())["peftc_technique"]
        == "test_bias_shift"
    )
    torch.testing.assert_close(peftc.load_adapter(peftc.capture(model, (x,)), folder)(x), shifted)


def test_applying_passes_after_merge_shares_what_merge_kept():
    """The original weights and adapter tensors merge keeps must not be copied by every later
    apply."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    merged = peftc.apply(
        peftc.capture(model, (torch.randn(3, 8),)), "lora(r=2, targets='0|1'), merge"
    )
    later = peftc.apply(merged, "dce")
    before, after = adapters(merged)["default"], adapters(later)["default"]
    assert before.kept and all(after.kept[k] is v for k, v in before.kept.items())
    originals = merged.meta["peftc"]["merged_bases"]["0"][1]
    assert all(later.meta["peftc"]["merged_bases"]["0"][1][k] is v for k, v in originals.items())


@dataclass(frozen=True)
class ShiftOptions(AdapterOptions):
    pass


class _Shift(Technique):
    """y -> y + d (an `add` term), merged into the bias; a base for the declarations below."""

    options, stage, peft_type = ShiftOptions, "add", None

    def params(self, ctx):
        return [Param("shift", (ctx.site.out_features,))]

    def build(self, b, x):
        return b.param("shift")

    def fold(self, ctx, weight, bias):
        return weight, ctx.tensor("shift").float() + (0 if bias is None else bias)


def test_registering_a_taken_name_or_peft_type_changes_nothing():
    before = peftc.technique.technique("lora")

    class Clash(_Shift):
        name = "lora"

    with pytest.raises(OptionError, match="a pass named 'lora' is already registered"):
        peftc.register_technique(Clash)
    assert peftc.technique.technique("lora") is before and peftc.apply(
        captured("tiny-llama"), "lora(r=2)"
    )

    class SameType(_Shift):
        name, peft_type = "test_same_type", "LORA"

    with pytest.raises(
        OptionError, match="loads peft_type 'LORA', which technique 'lora' already loads"
    ):
        peftc.register_technique(SameType)
    assert (
        "test_same_type" not in peftc.technique.techniques()
        and "test_same_type" not in peftc.registered_passes()
    )

    class Version1(_Shift):
        name = "test_replaced"

    class Version2(_Shift):
        name = "test_replaced"

    peftc.register_technique(Version1)
    with pytest.raises(
        OptionError, match="already registered; pick another name or pass replace=True"
    ):
        peftc.register_technique(Version2)
    # documented: a technique replaced by a new version of itself
    peftc.register_technique(Version2, replace=True)
    assert isinstance(peftc.technique.technique("test_replaced"), Version2)
    with pytest.raises(OptionError, match="already registered"):  # never another pass
        peftc.register_technique(type("Merge", (_Shift,), {"name": "merge"}), replace=True)


def test_a_wrong_fold_is_caught_at_the_first_merge_and_changes_nothing():
    """The fold forgets the bias: merged outputs would move with no error. The first merge checks
    it."""

    @peftc.register_technique(replace=True)
    class ForgetsBias(_Shift):
        name = "test_forgets_bias"

        def fold(self, ctx, weight, bias):
            return weight, bias

    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(6, 4)
    gm = fill_trainable(peftc.apply(peftc.capture(model, (x,)), "test_forgets_bias(targets='0')"))
    with pytest.raises(
        PassError,
        match="test_forgets_bias: its fold does not compute what its rewrite computes at '0'",
    ):
        peftc.apply(gm, "merge")
    assert not adapters(gm)["default"].merged and "folds_checked" not in gm.meta["peftc"]
    right = fill_trainable(
        peftc.apply(peftc.capture(model, (x,)), "test_bias_shift_checked(targets='0|2')")
    )
    merged = peftc.apply(right, "merge")
    assert merged.meta["peftc"]["folds_checked"] == ["test_bias_shift_checked"]
    torch.testing.assert_close(merged(x), right(x))


def test_a_wrong_fold_is_caught_while_the_update_is_still_zero():
    """LoRA-like: B starts at zero, so at init any fold agrees with the rewrite on the real
    tensors; the check moves the adapter's trainable tensors first."""

    @peftc.register_technique(replace=True)
    class DoubledDelta(Technique):
        name, options, peft_type = "test_doubled_delta", ShiftOptions, None

        def params(self, ctx):
            site = ctx.site
            A = Param("A", (2, site.in_features), init=peftc.technique.kaiming_uniform)
            return [A, Param("B", (site.out_features, 2))]

        def build(self, b, x):
            down = b.call(aten.linear.default, x, b.param("A"), role="down")
            return b.call(aten.linear.default, down, b.param("B"), role="up")

        def delta(self, ctx):
            return 2 * ctx.tensor("B") @ ctx.tensor("A")

    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(6, 4)
    gm = peftc.apply(peftc.capture(model, (x,)), "test_doubled_delta(targets='0')")
    with pytest.raises(PassError, match="test_doubled_delta: its fold does not compute"):
        peftc.apply(gm, "merge")


@peftc.register_technique(replace=True)
class _CheckedShift(_Shift):
    name = "test_bias_shift_checked"


def test_a_technique_without_check_fails_with_its_name_and_site():
    """A shape constraint nobody declared: the error names the technique and the site, not a
    node."""

    @peftc.register_technique(replace=True)
    class SquareOnly(_Shift):
        name = "test_square_only"

        def params(self, ctx):
            return [Param("rotation", (ctx.site.in_features, ctx.site.in_features))]

        def build(self, b, x):
            # (in, in) @ (out, in)
            rotated = b.call(aten.mm.default, b.param("rotation"), b.weight(), role="rotated")
            return b.call(aten.linear.default, x, rotated, role="update")

        def fold(self, ctx, weight, bias):
            return weight + ctx.tensor("rotation") @ weight, bias

    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5))
    gm = peftc.capture(model, (torch.randn(6, 4),))
    assert peftc.apply(gm, "test_square_only(targets='2')")  # square: fine
    with pytest.raises(
        peftc.errors.VerificationError,
        match=r"test_square_only.*adapter 'default'.*linear site '0'",
    ):
        peftc.apply(gm, "test_square_only(targets='0')")


def test_targets_take_peft_s_list_of_names_with_peft_s_meaning():
    """`targets=["q_proj", "v_proj"]` (or peft's spelling `target_modules=`) selects the modules
    peft's list does: each name as the whole path or its end after a dot; a bare name as a glob
    is refused with that spelling suggested."""
    gm = captured("tiny-llama")
    listed = peftc.apply(gm, "lora(targets=['q_proj', 'v_proj'])")
    spelled = peftc.apply(gm, "lora(target_modules=['q_proj', 'v_proj'])")
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj"])
    theirs = peft.get_peft_model(copy.deepcopy(loaded("tiny-llama").model), config)
    expected = set(theirs.base_model.targeted_module_names)
    for ours in (listed, spelled):
        assert {path for path, _ in adapters(ours)["default"].sites} == expected
    with pytest.raises(TargetError, match=r"Did you mean peft's list \['q_proj', 'v_proj'\]"):
        peftc.apply(gm, "lora(targets='q_proj|v_proj')")
    with pytest.raises(OptionError, match="target_modules must name the adapted modules"):
        peftc.apply(gm, "lora(targets=[1, 2])")


def test_a_saved_adapter_has_a_model_card_as_peft_writes(tmp_path):
    """README.md beside the adapter, with peft's library tag; a card the folder already had is
    kept as it was."""
    gm = peftc.apply(captured("tiny-llama"), "lora(targets=['q_proj'])")
    card = (peftc.save_adapter(gm, tmp_path / "a") / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\ntags:\n- peftc\n- lora\n---\n")
    assert "PeftModel.from_pretrained(base_model, folder)" in card
    (tmp_path / "a" / "README.md").write_text("my notes\n")
    assert (peftc.save_adapter(gm, tmp_path / "a") / "README.md").read_text() == "my notes\n"
