"""The user-authored pass in examples/custom_pass.py, registered and run from pipeline text."""

import pytest
import torch

import peftc
from examples.custom_pass import AttnScaleOptions  # registers attn_scale
from peftc.errors import OptionError

from conftest import captured, loaded


def test_attn_scale_preserves_outputs_and_trains_only_the_scales():
    lm = loaded("tiny-llama")
    gm = peftc.apply(captured("tiny-llama"), "freeze, attn_scale(init=1.0)", check_numerics=True)
    assert [n for n, p in gm.named_parameters() if p.requires_grad] == [
        "model.layers.0.self_attn.attn_scale",
        "model.layers.1.self_attn.attn_scale",
    ]
    expected = lm.model(*lm.args, **lm.kwargs, use_cache=False).logits
    logits = gm(*lm.args, **lm.kwargs).logits
    torch.testing.assert_close(logits, expected)
    logits.square().mean().backward()
    scales = [p for p in gm.parameters() if p.requires_grad]
    assert all(s.grad is not None and s.grad.abs() > 0 for s in scales)
    assert all(p.grad is None for p in gm.parameters() if not p.requires_grad)
    assert len(peftc.tagged(gm, role="scale")) == 2


def test_attn_scale_changes_outputs_when_not_one():
    lm = loaded("tiny-llama")
    gm = peftc.apply(captured("tiny-llama"), 'attn_scale(init=0.5, targets="model.layers.1.*")')
    assert len(peftc.tagged(gm, **{"pass": "attn_scale", "role": "scaled_output"})) == 1
    expected = lm.model(*lm.args, **lm.kwargs, use_cache=False).logits
    assert not torch.allclose(gm(*lm.args, **lm.kwargs).logits, expected)


def test_attn_scale_options_are_checked():
    with pytest.raises(OptionError, match="init must be positive"):
        peftc.Pipeline.parse("attn_scale(init=-1)")
    assert AttnScaleOptions().init == 1.0
    with pytest.raises(peftc.errors.TargetError, match="no attention site"):
        peftc.apply(captured("tiny-llama"), "attn_scale(targets='*.mlp')")
