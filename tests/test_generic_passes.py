import torch
import torch.nn.functional as F
from torch import nn

import peftc
from peftc.tools.models import example_inputs, tiny_model

from conftest import captured


class WithDeadCode(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        unused = torch.relu(x) * 3  # noqa: F841  dead: never reaches the output
        return self.fc(x)


class NoParameters(nn.Module):
    def forward(self, x):
        return F.relu(x) + 1


def run(gm, text):
    return peftc.Pipeline.parse(text).run(gm)


def test_dce_removes_dead_nodes_and_keeps_outputs():
    model = WithDeadCode()
    x = torch.randn(3, 4)
    gm = peftc.capture(model, (x,), method="symbolic")
    result = run(gm, "dce")
    assert result.results[0].modified and result.results[0].nodes_removed == 2
    assert {n.target for n in result.graph_module.graph.nodes if n.op == "call_function"} == set()
    torch.testing.assert_close(result.graph_module(x), model(x))
    again = run(result.graph_module, "dce")
    assert not again.results[0].modified


def test_dce_keeps_impure_dropout_and_parameters():
    gm = captured("tiny-bert")
    out = run(gm, "dce").graph_module
    assert sum(isinstance(m, nn.Dropout) for m in out.modules()) == sum(
        isinstance(m, nn.Dropout) for m in gm.modules()
    )
    assert set(out.state_dict()) == set(gm.state_dict())


def test_identity_changes_nothing():
    gm = captured("tiny-llama")
    result = run(gm, "identity")
    assert not result.results[0].modified
    assert not peftc.diff(gm, result.graph_module).changed


def test_freeze_keeps_tied_weights_tied_and_model_untouched():
    model = tiny_model("gpt2")
    args, kwargs = example_inputs(model)
    gm = peftc.capture(model, args, kwargs)
    frozen = run(gm, "freeze").graph_module
    assert frozen.get_parameter("lm_head.weight") is frozen.get_parameter("transformer.wte.weight")
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert frozen.get_parameter("lm_head.weight").data_ptr() == model.lm_head.weight.data_ptr()
    torch.testing.assert_close(
        frozen(*args, **kwargs).logits, model(*args, **kwargs, use_cache=False).logits
    )


def test_passes_on_a_graph_without_parameters():
    x = torch.randn(2, 3)
    gm = peftc.capture(NoParameters(), (x,))
    result = run(gm, "freeze, dce, identity")
    assert [r.modified for r in result.results] == [False, False, False]
    torch.testing.assert_close(result.graph_module(x), F.relu(x) + 1)
