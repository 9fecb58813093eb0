"""The `cpt` pass against HF peft's CPT (CPTConfig): init from token ids, the projected deltas
written back into the parameter, outputs, masked gradients, checkpoints both ways, a second adapter;
refusals by name."""

import copy
import json

import peft
import pytest
import torch

import peftc
import peftc.techniques.cpt  # registers the pass
from peftc.errors import CheckpointError, OptionError
from peftc.ir.pipeline import Pipeline
from peftc.tools.parity import against_peft, close

from conftest import captured, loaded

IDS, TYPES = [5, 9, 17, 3, 40], [1, 2, 3, 4, 2]  # template, input, template, label, input
DELTA = "prompt_encoder.default.delta_embedding.weight"


def rewrite(gm, **options):
    return Pipeline([("cpt", options)]).run(gm).graph_module


def test_matches_peft_projection_gradients_and_checkpoints(tmp_path):
    ids = torch.randint(3, 256, (3, 7), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # a right-padded row
    base = peftc.apply(captured("tiny-llama"), "freeze")
    config = peft.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=IDS, cpt_tokens_type_mask=TYPES)
    parity = against_peft(
        copy.deepcopy(loaded("tiny-llama").model),
        (ids, mask),
        {},
        config,
        tmp_path,
        graph=base,
        view=lambda out: out[0][:, -7:],
    )
    assert max(parity.output, parity.gradient, parity.reloaded) < 1e-5 and parity.merged is None
    # from init: E = the ids' rows; deltas beyond their bound, projected in place by both
    ours = rewrite(base, token_ids=IDS, type_mask=TYPES, epsilon=0.05)
    theirs = peft.get_peft_model(
        copy.deepcopy(loaded("tiny-llama").model),
        peft.CPTConfig(
            task_type="CAUSAL_LM",
            cpt_token_ids=IDS,
            cpt_tokens_type_mask=TYPES,
            opt_projection_epsilon=0.05,
        ),
    )
    encoder = theirs.prompt_encoder.default
    assert torch.equal(
        ours.get_buffer("prompt_encoder.default.embedding.weight"), encoder.embedding.weight
    )
    delta = torch.randn(len(IDS), 64, generator=torch.Generator().manual_seed(1)) * 0.1
    delta[1] *= 1e-3  # within its bound: kept
    with torch.no_grad():
        ours.get_parameter(DELTA).copy_(delta)
        encoder.delta_embedding.weight.copy_(delta)
    got, expected = ours(ids, mask)[0], theirs(input_ids=ids, attention_mask=mask).logits[:, -7:]
    close(got, expected, "outputs")
    close(ours.get_parameter(DELTA), encoder.delta_embedding.weight, "projected deltas")
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(2))
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    grad = ours.get_parameter(DELTA).grad
    close(grad, encoder.delta_embedding.weight.grad, "delta gradient")
    assert not grad[3].any() and grad[[0, 1, 2, 4]].abs().min(1).values.gt(0).all()
    # both ways: what peft saves is E + project(delta); the loaded delta starts at zero
    peftc.save_adapter(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["cpt_tokens_type_mask"] == TYPES and written["peft_type"] == "CPT"
    again = peft.PeftModel.from_pretrained(
        copy.deepcopy(loaded("tiny-llama").model), tmp_path / "ours"
    )
    close(again(input_ids=ids, attention_mask=mask).logits[:, -7:], got, "peft on peftc's")
    theirs.save_pretrained(tmp_path / "peft")
    # a second adapter, one active at a time
    with pytest.raises(OptionError, match="would be active together"):
        peftc.load_adapter(ours, tmp_path / "peft", adapter="trained")
    both = peftc.load_adapter(
        peftc.apply(ours, "disable_adapters"), tmp_path / "peft", adapter="trained"
    )
    close(both(ids, mask)[0], got, "peftc on peft's checkpoint")
    switched = peftc.apply(both, "set_adapter(name='default')")
    torch.testing.assert_close(switched(ids, mask)[0], ours(ids, mask)[0])


def test_refuses_what_it_does_not_implement(tmp_path):
    gm = captured("tiny-llama")
    with pytest.raises(OptionError, match="type_mask has 2 entries and token_ids 3"):
        rewrite(gm, token_ids=[1, 2, 3], type_mask=[1, 2])
    with pytest.raises(OptionError, match=r"token_ids must lie in \[0, 256\)"):
        rewrite(gm, token_ids=[1, 999])
    with pytest.raises(OptionError, match="CAUSAL_LM"):
        rewrite(captured("tiny-bert"), token_ids=[1, 2])
    merged = Pipeline([("merge", {})]).run(rewrite(gm, token_ids=[1, 2])).results[0]
    assert not merged.modified and "not a weight update" in merged.report
    # peft's CPT loss lives in PeftModel.forward: its weighting is refused by name
    model = peft.get_peft_model(
        copy.deepcopy(loaded("tiny-llama").model),
        peft.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[1, 2], opt_weighted_loss_type="decay"),
    )
    model.save_pretrained(tmp_path / "decay")
    with pytest.raises(CheckpointError, match="opt_weighted_loss_type='decay'"):
        peftc.load_adapter(gm, tmp_path / "decay")
