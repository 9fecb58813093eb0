import re
from dataclasses import dataclass
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import peftc
from peftc.errors import (
    OptionError,
    PassError,
    PipelineSyntaxError,
    UnknownPassError,
    VerificationError,
)
from peftc.ir.pipeline import Pipeline, Step
from peftc.ir.registry import get_pass


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(6, 12)
        self.down = nn.Linear(12, 6)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = MLP()
    return model, peftc.capture(model, (torch.randn(3, 6),))


@dataclass(frozen=True)
class DemoOptions:
    r: int = 8
    alpha: float = 16.0
    targets: str | None = None
    init: Literal["zeros", "ones"] = "zeros"
    layers: tuple[int, ...] = ()
    flag: bool = False

    def __post_init__(self):
        if self.r <= 0:
            raise OptionError(f"demo: r must be positive, got {self.r}")


@peftc.register_pass("demo", options=DemoOptions, replace=True)
def demo(gm: fx.GraphModule, options: DemoOptions) -> peftc.PassResult:
    """A pass used to test options: changes nothing."""
    return peftc.PassResult(gm, modified=False, report="a test pass that changes nothing")


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("dce", "dce"),
        ("  freeze ,dce,identity  ", "freeze, dce, identity"),
        ("demo(r=8)", "demo"),  # defaults are dropped
        (
            "demo(r=4, alpha=2, targets='*.q_proj|*.v_proj')",
            'demo(r=4, alpha=2.0, targets="*.q_proj|*.v_proj")',
        ),
        ('demo(flag=true, init="ones")', 'demo(init="ones", flag=true)'),
        ("demo(layers=[0, 2], flag=True)", "demo(layers=[0, 2], flag=true)"),
        ("demo(targets=none)", "demo"),
        ("freeze,\n  demo(r=2),\n  dce", "freeze, demo(r=2), dce"),
        ("", ""),
    ],
)
def test_pipeline_text_round_trips(text, canonical):
    pipeline = Pipeline.parse(text)
    assert str(pipeline) == canonical
    assert Pipeline.parse(str(pipeline)) == pipeline


def test_pipeline_built_in_code_equals_parsed():
    built = Pipeline(["freeze", ("demo", {"r": 4, "alpha": 2}), Step.make("dce")])
    assert built == Pipeline.parse("freeze, demo(r=4, alpha=2.0), dce")
    assert built.steps[1].options == DemoOptions(r=4, alpha=2.0)
    assert isinstance(built.steps[1].options.alpha, float)
    assert len(built + Pipeline(["identity"])) == 4


def test_syntax_error_shows_the_column():
    with pytest.raises(PipelineSyntaxError) as err:
        Pipeline.parse("freeze, demo(r=8")
    lines = str(err.value).splitlines()
    assert lines[1].strip() == "freeze, demo(r=8"
    assert lines[2].index("^") - lines[1].index("f") == len("freeze, demo")


def test_unknown_pass_suggests_near_names():
    with pytest.raises(UnknownPassError) as err:
        Pipeline.parse("freeze, fereze")
    message = str(err.value)
    assert "unknown pass 'fereze'" in message and "did you mean 'freeze'" in message
    assert message.splitlines()[2].index("^") == message.splitlines()[1].index("fereze")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("demo(r='eight')", "option 'r' of pass 'demo' must be int, got str 'eight'"),
        # peft's 'rank' is accepted as r
        (
            "demo(rnak=8)",
            "pass 'demo' has no option 'rnak'. did you mean 'r'?",
        ),
        ("demo(init='random')", "must be one of 'zeros', 'ones'"),
        ("demo(flag=1)", "option 'flag' of pass 'demo' must be bool"),
        ("demo(r=0)", "demo: r must be positive, got 0"),
        ("demo(layers=['a'])", "option 'layers' of pass 'demo' must be tuple"),
        ("freeze(x=1)", "pass 'freeze' takes no options"),
    ],
)
def test_bad_options(text, expected):
    with pytest.raises(OptionError) as err:
        Pipeline.parse(text)
    assert expected in str(err.value)
    assert "^" in str(err.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("demo(8)", "options of 'demo' must be named"),
        ("dce, 3", "expected a pass name"),
        ("demo(r=x)", "option values must be literals"),
        ("demo(**opts)", "'**' is not allowed"),
        ("a.b", "expected a pass name"),
    ],
)
def test_malformed_steps(text, expected):
    with pytest.raises(PipelineSyntaxError, match=expected.replace("(", r"\(").replace("*", r"\*")):
        Pipeline.parse(text)


def test_registering_a_duplicate_name_is_an_error():
    with pytest.raises(OptionError, match="already registered"):
        peftc.register_pass("dce")(lambda gm: peftc.PassResult(gm, False))
    with pytest.raises(OptionError, match="must be a Python identifier"):
        peftc.register_pass("my-pass")
    with pytest.raises(OptionError, match="no pass named 'dcee'. did you mean 'dce'"):
        get_pass("dcee")


def test_apply_copies_and_records_statistics(mlp):
    model, gm = mlp
    result = Pipeline.parse("freeze, dce, identity").run(gm)
    out = result.graph_module
    assert out is not gm and all(p.requires_grad for p in gm.parameters())
    freeze, dce, identity = result.results
    assert (
        freeze.modified and freeze.sites == ("down", "up") and freeze.report == "froze 4 parameters"
    )
    assert not dce.modified and not identity.modified
    assert freeze.seconds >= 0 and freeze.name == "freeze"
    assert [h["pass"] for h in out.meta["peftc"]["history"]] == ["freeze", "dce", "identity"]
    assert re.search(r"^freeze +yes +2 ", str(result), re.M)
    x = torch.randn(4, 6)
    torch.testing.assert_close(out(x), model(x))


def test_apply_inplace(mlp):
    _, gm = mlp
    copy = peftc.ir.graph.clone(gm)
    assert peftc.apply(copy, "freeze", inplace=True) is copy


def test_apply_needs_a_graph_module():
    with pytest.raises(PassError, match="call peftc.capture"):
        peftc.apply(MLP(), "dce")


def add_pass(name, fn, **kwargs):
    peftc.register_pass(name, replace=True, **kwargs)(fn)


def test_statistics_count_added_nodes_and_parameters(mlp):
    _, gm = mlp

    def add_bias(gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        (value,) = out.args[0]
        peftc.ir.graph.set_tensor(gm, "extra.bias", nn.Parameter(torch.zeros(6)))
        with gm.graph.inserting_before(out):
            bias = gm.graph.get_attr("extra.bias")
            added = gm.graph.call_function(torch.ops.aten.add.Tensor, (value, bias))
        out.args = ((added,),)
        return peftc.PassResult(gm, modified=True, sites=("extra",))

    add_pass("add_bias", add_bias, preserves_outputs=True)
    result = Pipeline.parse("add_bias").run(gm, check_numerics=True)
    (stats,) = result.results
    assert (stats.nodes_added, stats.nodes_removed, stats.params_added) == (2, 0, ("extra.bias",))
    shape = (
        next(n for n in result.graph_module.graph.nodes if n.name == "add_tensor").meta["val"].shape
    )
    assert list(shape) == [3, 6]


def test_shape_verification_names_the_pass_and_node(mlp):
    _, gm = mlp

    def bad_shapes(gm):
        down = next(
            n
            for n in gm.graph.nodes
            if n.meta.get("module_path") == "down" and n.op == "call_function"
        )
        peftc.ir.graph.set_tensor(gm, "wrong", nn.Parameter(torch.zeros(5, 7)))
        with gm.graph.inserting_after(down):
            w = gm.graph.get_attr("wrong")
        with gm.graph.inserting_after(w):
            broken = gm.graph.call_function(torch.ops.aten.linear.default, (down, w))
        down.replace_all_uses_with(broken, delete_user_cb=lambda u: u is not broken)
        return peftc.PassResult(gm, modified=True)

    add_pass("bad_shapes", bad_shapes)
    with pytest.raises(
        VerificationError,
        match="after pass 'bad_shapes', shape propagation failed at node linear_default",
    ):
        peftc.apply(gm, "freeze, bad_shapes")
    peftc.apply(gm, "bad_shapes", verify=False)  # opting out is explicit


def test_lint_failure_is_a_verification_error(mlp):
    _, gm = mlp

    def dangling(gm):
        node = next(n for n in gm.graph.nodes if n.op == "call_function")
        node.args = (node.args[0], "not-a-node-but-fine", *node.args[2:])
        gm.graph.get_attr("does.not.exist")
        return peftc.PassResult(gm, modified=True)

    add_pass("dangling", dangling)
    with pytest.raises(VerificationError, match="dangling"):
        peftc.apply(gm, "dangling")


def test_numeric_check_catches_a_pass_that_changes_outputs(mlp):
    _, gm = mlp

    def scale_weights(gm):
        peftc.ir.graph.set_tensor(gm, "up.weight", nn.Parameter(gm.get_parameter("up.weight") * 2))
        return peftc.PassResult(gm, modified=True)

    add_pass("scale_weights", scale_weights, preserves_outputs=True)
    peftc.apply(gm, "scale_weights")  # the numeric check is opt-in
    with pytest.raises(VerificationError, match="declares preserves_outputs but changed output 0"):
        peftc.apply(gm, "scale_weights", check_numerics=True)


def test_pass_failures_are_wrapped_with_context(mlp):
    _, gm = mlp

    def explode(gm):
        raise KeyError("boom")

    def wrong_return(gm):
        return gm

    add_pass("explode", explode)
    add_pass("wrong_return", wrong_return)
    with pytest.raises(
        PassError, match=r"pass 'explode', run after freeze, failed: KeyError"
    ) as err:
        peftc.apply(gm, "freeze, explode")
    assert isinstance(err.value.__cause__, KeyError)
    with pytest.raises(PassError, match="returned GraphModule"):
        peftc.apply(gm, "wrong_return")
