"""Cartridge against HF peft (CartridgeConfig) on a GQA Llama: outputs, the trainable rows'
gradient, checkpoints both ways, the frozen rows; refusals."""

import json

import peft
import pytest
import torch

import peftc
import peftc.techniques.cartridge
from peftc.errors import CheckpointError, OptionError
from peftc.technique.adapters import adapters
from peftc.tools.models import example_inputs, tiny_model
from peftc.tools.parity import against_peft, close

from conftest import captured

# peft passes past_key_values (renamed cache)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.mark.parametrize("frozen", [0, 1, 3])
def test_parity_with_peft(frozen, tmp_path):
    model = tiny_model("llama")
    args, kwargs = example_inputs(model, batch=3, seq=7, seed=2)
    kwargs["attention_mask"][0, :2] = 0  # left padding
    config = peft.CartridgeConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, num_frozen_tokens=frozen
    )
    parity = against_peft(
        model, args, kwargs, config, tmp_path, graph=peftc.apply(captured("tiny-llama"), "freeze")
    )
    theirs = {n: p.shape for n, p in parity.peft.named_parameters() if p.requires_grad}
    ours = {n: p.shape for n, p in parity.graph.named_parameters() if p.requires_grad}
    assert ours == theirs == {"prompt_encoder.default.trainable_embedding": (3 - frozen, 128)}
    if frozen:  # a buffer, loaded from peft's prompt_embeddings
        got = parity.graph.get_buffer("prompt_encoder.default.frozen_embedding")
        close(got, parity.peft.prompt_encoder.default.frozen_embedding, "frozen rows")


def test_made_adapter_saves_as_peft(tmp_path):
    gm = peftc.apply(captured("tiny-llama"), "freeze, cartridge(n=4, num_frozen_tokens=2, seed=0)")
    assert gm.get_buffer("prompt_encoder.default.frozen_embedding").shape == (2, 128)
    peftc.save_adapter(gm, tmp_path)
    reloaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    args, kwargs = example_inputs(reloaded.get_base_model())
    expected = reloaded(*args, **kwargs, use_cache=False)[0]
    close(gm(*args, **kwargs)[0], expected, "peft on peftc's checkpoint")
    loaded = peftc.load_adapter(captured("tiny-llama"), tmp_path)
    torch.testing.assert_close(loaded(*args, **kwargs)[0], gm(*args, **kwargs)[0])


def test_refusals(tmp_path):
    gm = captured("tiny-llama")
    with pytest.raises(OptionError, match="num_frozen_tokens=3 exceeds n=2"):
        peftc.apply(gm, "cartridge(n=2, num_frozen_tokens=3)")
    with pytest.raises(OptionError, match="prefix_projection"):
        peftc.apply(gm, "cartridge(n=2, prefix_projection=True)")
    out = peftc.apply(gm, "cartridge(n=2, seed=0)")
    assert not adapters(peftc.apply(out, "merge"))["default"].merged  # not a weight update
    peftc.save_adapter(out, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "prefix_projection": True}))
    with pytest.raises(CheckpointError, match="prefix_projection"):
        peftc.load_adapter(gm, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": 3}))
    with pytest.raises(CheckpointError, match="does not fit"):
        peftc.load_adapter(gm, tmp_path)
