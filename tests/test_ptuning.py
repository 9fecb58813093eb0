"""The `ptuning` pass against HF peft's P-tuning (PromptEncoderConfig, MLP and LSTM encoders): init,
outputs, gradients of every encoder weight, checkpoints both ways (peft saves the encoder's
output)."""

import copy

import peft
import pytest
import torch

import peftc
from peftc.errors import OptionError
from peftc.ir.pipeline import Pipeline
from peftc.tools.parity import close

from conftest import captured, loaded


def rewrite(gm, name, **options):
    return Pipeline([(name, options)]).run(gm).graph_module


@pytest.mark.parametrize(
    "arch,encoder,task_type",
    [
        ("llama", "mlp", "CAUSAL_LM"),
        ("bert", "lstm", "FEATURE_EXTRACTION"),
        ("gemma", "mlp", "CAUSAL_LM"),
    ],
)
def test_ptuning_matches_peft_init_outputs_gradients_and_checkpoints(
    arch, encoder, task_type, tmp_path
):
    """The same seed gives peft's encoder weights (same modules, names and init order); outputs and
    every encoder gradient equal peft's; the saved encoder output loads in peft, peft's loads in
    prompt(n)."""
    base = peftc.apply(captured(f"tiny-{arch}"), "freeze")
    torch.manual_seed(5)
    gm = rewrite(base, "ptuning", n=4, encoder=encoder, hidden=32)
    torch.manual_seed(5)
    model = peft.get_peft_model(
        copy.deepcopy(loaded(f"tiny-{arch}").model),
        peft.PromptEncoderConfig(
            task_type=task_type,
            num_virtual_tokens=4,
            encoder_reparameterization_type=encoder.upper(),
            encoder_hidden_size=32,
        ),
    )
    # peft's names, its adapter name included
    ours = dict(gm.prompt_encoder.default.named_parameters())
    theirs = dict(model.prompt_encoder.default.named_parameters())
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    trainable = sorted(n for n, p in gm.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"prompt_encoder.default.{k}" for k in ours)
    ids = torch.randint(3, 256, (3, 7), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    got, expected = gm(ids, mask)[0], model(input_ids=ids, attention_mask=mask)[0][:, 4:]
    close(got, expected, "outputs")
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(2))
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    for k in ours:
        close(ours[k].grad, theirs[k].grad, f"gradient of {k}")
    peftc.save_adapter(gm, tmp_path / "ours")  # peft's P_TUNING: the encoder's output
    reloaded = peft.PeftModel.from_pretrained(
        copy.deepcopy(loaded(f"tiny-{arch}").model), tmp_path / "ours"
    )
    close(reloaded(input_ids=ids, attention_mask=mask)[0][:, 4:], got, "peft on peftc's checkpoint")
    model.save_pretrained(tmp_path / "peft")
    # loads as prompt(n=4)
    constant = peftc.load_adapter(captured(f"tiny-{arch}"), tmp_path / "peft")
    close(constant(ids, mask)[0], got, "peftc on peft's checkpoint")


def test_ptuning_errors_name_the_problem():
    with pytest.raises(OptionError, match="positive"):
        rewrite(captured("tiny-llama"), "ptuning", n=0)
    with pytest.raises(OptionError, match="hidden must be a positive integer"):
        rewrite(captured("tiny-llama"), "ptuning", n=2, hidden=0)
    with pytest.raises(OptionError, match="2048 positions"):
        rewrite(captured("tiny-llama"), "ptuning", n=4096)
