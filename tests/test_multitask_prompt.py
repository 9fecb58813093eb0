"""The `multitask_prompt` pass against HF peft's multitask prompt tuning
(MultitaskPromptTuningConfig) with per-row task ids: outputs, every gradient, checkpoints both ways,
init; refusals by name."""

import copy

import peft
import pytest
import torch

import peftc
import peftc.techniques.multitask_prompt  # registers the pass
from peftc.errors import CheckpointError, OptionError
from peftc.ir.pipeline import Pipeline
from peftc.tools.parity import against_peft

from conftest import captured, loaded

N = 4


def rewrite(gm, **options):
    return Pipeline([("multitask_prompt", options)]).run(gm).graph_module


def test_matches_peft_with_task_ids(tmp_path):
    ids = torch.randint(3, 256, (3, 7), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # a right-padded row
    base = peftc.apply(captured("tiny-llama"), "freeze")
    config = peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, num_tasks=3, num_ranks=2
    )
    parity = against_peft(
        copy.deepcopy(loaded("tiny-llama").model),
        (ids, mask),
        {"task_ids": torch.tensor([2, 0, 2])},
        config,
        tmp_path,
        graph=base,
        view=lambda out: out[0][:, -7:],
    )
    assert max(parity.output, parity.gradient, parity.reloaded) < 1e-5 and parity.merged is None
    # the same seed gives peft's tensors, in peft's order of draws
    torch.manual_seed(3)
    ours = rewrite(base, n=N, num_tasks=3, num_ranks=2)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(loaded("tiny-llama").model), config)
    for name, p in theirs.prompt_encoder.default.named_parameters():
        assert torch.equal(ours.get_parameter(f"prompt_encoder.default.{name}"), p), name


def test_refuses_what_it_does_not_implement(tmp_path):
    gm = captured("tiny-llama")
    with pytest.raises(OptionError, match="prompt_tuning_init_state_dict_path"):
        rewrite(gm, n=N, init="exact_source_task")
    with pytest.raises(OptionError, match="'random' or 'text'"):
        rewrite(gm, n=N, init="vocab")
    merged = Pipeline([("merge", {})]).run(rewrite(gm, n=N)).results[0]
    assert not merged.modified and "not a weight update" in merged.report
    model = peft.get_peft_model(
        copy.deepcopy(loaded("tiny-llama").model),
        peft.MultitaskPromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=N, num_transformer_submodules=2
        ),
    )
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="num_transformer_submodules"):
        peftc.load_adapter(gm, tmp_path)
